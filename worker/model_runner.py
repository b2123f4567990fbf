"""One forward over a ragged batch: flatten the scheduled tokens, attend through the pool, return logits.

Input is `[1, T]` (every request's new tokens side by side) with per-token
position ids; `worker.paged_attention` does the per-request attention. Only
the rows whose chunk reaches the request's newest token are projected to
logits (`logits_to_keep` given as indices), one row per such request.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence as Seq

import torch

from worker.config import AttentionMode
from worker.paged_attention import Span, StepAttention, active_step
from worker.sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: torch.Tensor, block_size: int, device: torch.device, mode: AttentionMode):
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = device
        self.mode = mode
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def run(self, batch: Seq[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits [n, vocab] for the n requests of `batch` that get a new token, and those requests."""
        ids: list[int] = []
        positions: list[int] = []
        spans: list[Span] = []
        keep: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in batch:
            start = seq.kv_len
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            spans.append(self._span(seq, len(ids) - n, n))
            if start + n == seq.num_tokens:
                keep.append(len(ids) - 1)
                sampled.append(seq)
        w_slots = torch.cat([s.slots[-s.q_len :] for s in spans])
        w_offsets = torch.cat([s.offsets[-s.q_len :] for s in spans])
        step = StepAttention(self.pool, spans, w_slots, w_offsets, self.mode)
        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        rows = torch.tensor(keep or [len(ids) - 1], dtype=torch.long, device=self.device)
        kw = {"logits_to_keep": rows} if self._keep_arg else {}
        with active_step(step):
            logits = self.model(input_ids=inp, position_ids=pos, use_cache=False, **kw).logits[0]
        if not self._keep_arg:
            logits = logits[rows]
        return logits[: len(sampled)], sampled

    def _span(self, seq: Sequence, q_start: int, n: int) -> Span:
        ctx = seq.kv_len + n
        blocks = torch.tensor(seq.table[: -(-ctx // self.block_size)], dtype=torch.long, device=self.device)
        slots = blocks.repeat_interleave(self.block_size)[:ctx]
        offsets = torch.arange(ctx, device=self.device) % self.block_size
        return Span(q_start, n, ctx, blocks, slots, offsets)
