"""From sampled tokens to what the caller sees: streamed text pieces, stop strings, the Result.

Streaming holds back text that may still change: a trailing replacement
character (a multi-byte character cut in half by tokenization) and, when
stop strings are set, the last len(longest stop) - 1 characters (they may
be the start of a stop string, which is never sent). Token ids go out as
they are sampled.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from cache_store.counter_names import DEVICE, HOST, PEER
from worker.request import Result
from worker.sequence import Chunk, Sequence


def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """`text` up to the first stop string, or None if none occurs."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(cuts)] if cuts else None


@dataclass
class DecodeState:
    """Where a request's incremental detokenizing stands: `text` is the text of out[:read];
    out[prefix:read] is the window decoded again beside each new token (a token's text can
    depend on its neighbours, e.g. a multi-byte character split across tokens)."""

    text: str = ""
    prefix: int = 0
    read: int = 0
    sent: int = 0  # characters of `text` already streamed
    checked: int = 0  # characters of `text` already searched for stop strings


class Detokenizer:
    """Text from token ids at O(new tokens) per step (vLLM's incremental scheme): each step decodes
    only a short window at the tail; the Result's text is one full decode at the end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.out, skip_special_tokens=True)

    def _advance(self, seq: Sequence) -> DecodeState:
        st = seq.detok
        if st is None:
            st = seq.detok = DecodeState()
        if st.read < len(seq.out):
            decode = self.tokenizer.decode
            before = decode(seq.out[st.prefix : st.read], skip_special_tokens=True)
            after = decode(seq.out[st.prefix :], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                st.text += after[len(before) :]
                st.prefix, st.read = st.read, len(seq.out)
        return st

    def stop_hit(self, seq: Sequence) -> bool:
        """Does the text so far contain a stop string? Searches only text not searched before
        (plus the longest stop's length, for a stop string that straddles the boundary)."""
        stops = seq.req.stop
        if not stops:
            return False
        st = self._advance(seq)
        start = max(0, st.checked - max(map(len, stops)) + 1)
        st.checked = len(st.text)
        return any(st.text.find(s, start) >= 0 for s in stops)

    def piece(self, seq: Sequence, final: bool) -> Chunk | None:
        """New text and token ids since the last piece (all the text when final, cut at a stop
        string). Token ids are never held back: a piece may carry ids and no text yet. Streamed
        text holds back what may still change: an incomplete character and, with stop strings,
        the last len(longest stop) - 1 characters."""
        st = self._advance(seq)
        if final:
            text = self.text(seq)
            cut = cut_at_stop(text, seq.req.stop) if seq.req.stop else None
            end = len(text if cut is None else cut)
        else:
            text = st.text
            end = len(text) - (max(map(len, seq.req.stop)) - 1 if seq.req.stop else 0)
        new_text = text[st.sent : end] if end > st.sent else ""
        new_ids = tuple(seq.out[seq.sent_tokens :])
        st.sent = max(end, st.sent)
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
        cached_device_tokens=seq.by_tier[DEVICE],
        cached_host_tokens=seq.by_tier[HOST],
        cached_peer_tokens=seq.by_tier[PEER],
    )
