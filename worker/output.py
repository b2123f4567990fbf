"""From sampled tokens to what the caller sees: streamed text pieces, stop strings, the Result.

Streaming holds back text that may still change: a trailing replacement
character (a multi-byte character cut in half by tokenization) and, when
stop strings are set, the last len(longest stop) - 1 characters (they may
be the start of a stop string, which is never sent). Token ids go out as
they are sampled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

from worker.request import Result
from worker.sequence import Chunk, Sequence


def cut_at_stop(text: str, stops: Seq[str]) -> str | None:
    """`text` up to the first stop string, or None if none occurs."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else None


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.out, skip_special_tokens=True)

    def stop_hit(self, seq: Sequence) -> bool:
        return bool(seq.req.stop) and cut_at_stop(self.text(seq), seq.req.stop) is not None

    def piece(self, seq: Sequence, final: bool) -> Chunk | None:
        """New text and token ids since the last piece (all the text when final, cut at a stop
        string). Token ids are never held back: a piece may carry ids and no text yet."""
        text = self.text(seq)
        if final:
            cut = cut_at_stop(text, seq.req.stop) if seq.req.stop else None
            end = len(text if cut is None else cut)
        else:
            end = len(text) - (max(map(len, seq.req.stop)) - 1 if seq.req.stop else 0)
            if text[:end].endswith("\ufffd"):
                end -= 1
        new_text = text[seq.sent_text : end] if end > seq.sent_text else ""
        new_ids = tuple(seq.out[seq.sent_tokens :])
        seq.sent_text = max(end, seq.sent_text)
        seq.sent_tokens = len(seq.out)
        return Chunk(new_text, new_ids) if new_text or new_ids else None


def build_result(seq: Sequence, text: str, worker_id: str) -> Result:
    done = time.perf_counter()
    first = seq.t_first or done
    return Result(
        text=text,
        token_ids=tuple(seq.out),
        prompt_tokens=len(seq.prompt),
        cached_tokens=seq.cached_tokens,
        worker_id=worker_id,
        ttft_s=first - seq.arrived,
        id=seq.req.id,
        finish_reason=seq.finish_reason or "length",
        latency_s=done - seq.arrived,
        queue_s=(seq.admitted or done) - seq.arrived,
        cached_device_tokens=seq.by_tier["device"],
        cached_host_tokens=seq.by_tier["host"],
        cached_peer_tokens=seq.by_tier["peer"],
    )
