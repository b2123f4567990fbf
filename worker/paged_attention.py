"""Attention over the device pool's blocks: the KV cache of a ragged batch IS the device tier.

The model runs one flattened batch per step: input `[1, T]` with the new
tokens of every scheduled request side by side and per-token position ids
(RoPE is applied by the model itself). This module is registered with
transformers as attention implementation `ATTN_NAME`; each layer calls it with
the new tokens' query/key/value, and it

  1. writes the new keys and values into their pool slots
     (`pool[slot, layer, 0|1, :, offset]`), then
  2. for each request, reads its whole context from the pool through its block
     table and attends to it (causal within the request's new tokens).

So a cached prefix is read in place from the blocks the request holds (no
copy into a per-request cache), and a block a request fills is already where
the cache keeps it. Requests never see each other's tokens.

Two ways to run step 2, chosen per step by `AttentionMode`: one SDPA call per
request (work proportional to each request's own context), or one SDPA call
for the whole batch with a block-diagonal causal mask (one kernel, but work
proportional to tokens x all contexts). `BENCHMARKS.md` has the measurement
behind the default.

Outside a step (plain `generate()` on the same model, as the exactness tests
do) the function is plain SDPA, so registering it changes nothing else.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from worker.config import AttentionMode

ATTN_NAME = "prefixcache_paged"


@dataclass(frozen=True)
class Span:
    """One request's part of a step: query rows [q_start, q_start + q_len) attend to its first
    `ctx` tokens, which live at (slots[i], offsets[i]) in the pool."""

    q_start: int
    q_len: int
    ctx: int
    blocks: torch.Tensor  # [ceil(ctx / block_size)] long, device: the block table's first entries
    slots: torch.Tensor  # [ctx] long, device: blocks, one entry per token
    offsets: torch.Tensor  # [ctx] long, device


class StepAttention:
    """Everything one forward's attention needs; built once per step, used by every layer."""

    def __init__(
        self,
        pool: torch.Tensor,  # [capacity, layers, 2, kv_heads, block_size, head_dim]
        spans: list[Span],
        write_slots: torch.Tensor,  # [T] slot of each new token
        write_offsets: torch.Tensor,  # [T] offset in its block
        mode: AttentionMode,
    ):
        self.pool = pool
        self.spans = spans
        self.write_slots = write_slots
        self.write_offsets = write_offsets
        self.mode = mode
        self.masks = [_causal_tail(s.q_len, s.ctx, pool.device) for s in spans] if mode == "per_request" else []
        if mode == "masked":
            self.all_slots = torch.cat([s.slots for s in spans])
            self.all_offsets = torch.cat([s.offsets for s in spans])
            self.block_mask = _block_diagonal_causal(spans, pool.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None):
        """q: [1, heads, T, head_dim]; k, v: [1, kv_heads, T, head_dim] (new tokens only).
        Returns [1, T, heads, head_dim], the layout transformers' attention functions return."""
        keys = self.pool[:, layer, 0].permute(1, 0, 2, 3)  # [kv_heads, capacity, block, dim], a view
        values = self.pool[:, layer, 1].permute(1, 0, 2, 3)
        keys[:, self.write_slots, self.write_offsets] = k[0].to(keys.dtype)
        values[:, self.write_slots, self.write_offsets] = v[0].to(values.dtype)
        gqa = q.shape[1] != k.shape[1]
        if self.mode == "masked":
            kk = keys[:, self.all_slots, self.all_offsets].unsqueeze(0)
            vv = values[:, self.all_slots, self.all_offsets].unsqueeze(0)
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=self.block_mask, scale=scale, enable_gqa=gqa)
            return out.transpose(1, 2)
        outs = []
        for span, mask in zip(self.spans, self.masks):
            qq = q[:, :, span.q_start : span.q_start + span.q_len]
            kk = _context(self.pool[:, layer, 0], span)
            vv = _context(self.pool[:, layer, 1], span)
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale, enable_gqa=gqa))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out.transpose(1, 2)


def _context(tier: torch.Tensor, span: Span) -> torch.Tensor:
    """[1, kv_heads, ctx, dim] of one request from `tier` ([capacity, kv_heads, block, dim]).

    Whole blocks are copied (one contiguous chunk each), then laid end to end: measured on CPU at
    16 requests x 1k context, about half the time of gathering token by token through (slot, offset)."""
    got = tier.index_select(0, span.blocks)  # [n, kv_heads, block, dim]
    n, heads, block, dim = got.shape
    return got.transpose(0, 1).reshape(1, heads, n * block, dim)[:, :, : span.ctx]


def _causal_tail(q_len: int, ctx: int, device) -> torch.Tensor | None:
    """Mask for q_len new tokens at the end of a ctx-token context (None when nothing is hidden)."""
    if q_len == 1:
        return None
    rows = torch.arange(ctx - q_len, ctx, device=device).unsqueeze(1)
    return torch.arange(ctx, device=device).unsqueeze(0) <= rows


def _block_diagonal_causal(spans: list[Span], device) -> torch.Tensor:
    """[T, sum ctx]: each request's new tokens see only its own context, causally."""
    total_q = sum(s.q_len for s in spans)
    total_k = sum(s.ctx for s in spans)
    mask = torch.zeros((total_q, total_k), dtype=torch.bool, device=device)
    k0 = 0
    for s in spans:
        rows = torch.arange(s.ctx - s.q_len, s.ctx, device=device).unsqueeze(1)
        mask[s.q_start : s.q_start + s.q_len, k0 : k0 + s.ctx] = torch.arange(s.ctx, device=device) <= rows
        k0 += s.ctx
    return mask


_current = threading.local()


class active_step:
    """Context manager: this thread's forward passes attend through `step`."""

    def __init__(self, step: StepAttention):
        self.step = step

    def __enter__(self) -> StepAttention:
        _current.step = self.step
        return self.step

    def __exit__(self, *exc) -> None:
        _current.step = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepAttention | None = getattr(_current, "step", None)
    if step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return step.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTN_NAME, paged_attention)
# Outside a step the model is plain SDPA, so it needs SDPA's masks (e.g. padded batches in generate()).
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
