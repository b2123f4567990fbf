"""Attention over the device pool's blocks: the KV cache of a ragged batch IS the device tier.

The model runs one flattened batch per step: input `[1, T]` with the new
tokens of every scheduled request side by side and per-token position ids
(RoPE is applied by the model itself). This module is registered with
transformers as attention implementation `ATTN_NAME`; each layer calls it with
the new tokens' query/key/value, and it

  1. writes the new keys and values into their pool slots, then
  2. lets every request attend to its whole context, read in place from the
     pool through its block table (causal within the request's new tokens).

So a cached prefix is read where the cache keeps it (no copy into a
per-request cache), and a block a request fills is already where the cache
keeps it. Requests never see each other's tokens.

Backends (`Engine.info()["attention"]` names the one running):
  - "cpu_kernel": `worker.kernels`' C++ op, one call per layer for every
    request, prefill chunks included (on 2 cores it beats SDPA with its
    context copy at every chunk measured, 16 to 256 rows over 16 to 4k keys:
    BENCHMARKS.md). A row's arithmetic depends only on its own query and
    keys, so with the packed linear layers (`worker.linear`) a request's
    bits are the same alone, in any batch and in any prefill chunking.
  - "triton" (CUDA): `worker.kernels.triton_paged`, one launch per layer for
    every request, prefill chunks included (tiles of 16 rows on tensor cores).
  - "sdpa": one SDPA call per request over a copy of its context; the
    fallback wherever neither is available.
Either way a request's attention depends only on its own tokens and chunk,
never on what shares the step (invariant 1's batch independence at
`max_running=1` holds).

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

from worker.config import AttentionBackend, AttentionMode

ATTN_NAME = "prefixcache_paged"


@dataclass(frozen=True)
class StepMeta:
    """Where one forward's new tokens go and what each of its B requests attends; built once per step
    by the runner, read by every layer."""

    write_slots: torch.Tensor  # [T] int64: block * block_size + offset of each new token
    tables: torch.Tensor  # [B, max_blocks] int32, contiguous: each request's block table (padded)
    ctx_lens: torch.Tensor  # [B] int32: context after this step (cached + new tokens)
    q_starts: torch.Tensor  # [B] int32: the request's first row among the T new tokens
    q_lens: torch.Tensor  # [B] int32
    spans: tuple[tuple[int, int, int], ...]  # the same (q_start, q_len, ctx) as host ints


class StepAttention:
    """One forward's attention through `backend`; built once per step, used by every layer."""

    def __init__(self, pool: torch.Tensor, meta: StepMeta, backend: AttentionBackend):
        self.pool = pool  # [capacity, layers, 2, kv_heads, block_size, head_dim]
        self.meta = meta
        self.backend = backend
        bs = pool.shape[4]
        self._write_blocks = meta.write_slots // bs
        self._write_offsets = meta.write_slots % bs
        self._max_q = max(q_len for _, q_len, _ in meta.spans)
        if backend in ("triton", "cpu_kernel"):
            self.alone = []  # one kernel call per layer for the whole batch
            self.kernel_args = (meta.tables, meta.ctx_lens, meta.q_starts, meta.q_lens)
        else:
            self.alone = list(range(len(meta.spans)))  # SDPA, request by request
            self.kernel_args = None
        self._masks = {i: _causal_tail(meta.spans[i][1], meta.spans[i][2], pool.device) for i in self.alone}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        """q: [1, heads, T, head_dim]; k, v: [1, kv_heads, T, head_dim] (new tokens only).
        Returns [1, T, heads, head_dim], the layout transformers' attention functions return."""
        self._write(layer, k[0], v[0])
        T, heads, dim = q.shape[2], q.shape[1], q.shape[3]
        if self.kernel_args is None and len(self.alone) == 1:
            return self._sdpa(layer, q, 0, scale).transpose(1, 2)
        out = torch.empty((T, heads, dim), dtype=q.dtype, device=q.device)
        if self.backend == "triton":
            from worker.kernels import triton_paged

            triton_paged.paged_attention(out, q[0], self.pool, layer, *self.kernel_args, scale, self._max_q)
        elif self.kernel_args is not None:
            torch.ops.prefixcache.paged_attention(out, q[0], self.pool, layer, *self.kernel_args, scale)
        for i in self.alone:
            q_start, q_len, _ = self.meta.spans[i]
            out[q_start : q_start + q_len] = self._sdpa(layer, q, i, scale)[0].transpose(0, 1)
        return out.unsqueeze(0)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [kv_heads, T, head_dim] into their slots of `layer`."""
        if self.backend == "cpu_kernel":
            torch.ops.prefixcache.write_kv(self.pool, layer, k, v, self.meta.write_slots)
            return
        keys = self.pool[:, layer, 0].permute(1, 0, 2, 3)  # [kv_heads, capacity, block, dim], a view
        values = self.pool[:, layer, 1].permute(1, 0, 2, 3)
        keys[:, self._write_blocks, self._write_offsets] = k.to(keys.dtype)
        values[:, self._write_blocks, self._write_offsets] = v.to(values.dtype)

    def _sdpa(self, layer: int, q: torch.Tensor, i: int, scale: float) -> torch.Tensor:
        """Request i's attention by SDPA over a copy of its context: [1, heads, q_len, dim]."""
        q_start, q_len, ctx = self.meta.spans[i]
        blocks = self.meta.tables[i, : -(-ctx // self.pool.shape[4])].long()
        kk = _context(self.pool[:, layer, 0], blocks, ctx)
        vv = _context(self.pool[:, layer, 1], blocks, ctx)
        qq = q[:, :, q_start : q_start + q_len]
        gqa = q.shape[1] != kk.shape[1]
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=self._masks[i], scale=scale, enable_gqa=gqa)


def _context(tier: torch.Tensor, blocks: torch.Tensor, ctx: int) -> torch.Tensor:
    """[1, kv_heads, ctx, dim] of one request from `tier` ([capacity, kv_heads, block, dim]).

    Whole blocks are copied (one contiguous chunk each), then laid end to end: measured on CPU at
    16 requests x 1k context, about half the time of gathering token by token through (slot, offset)."""
    got = tier.index_select(0, blocks)  # [n, kv_heads, block, dim]
    n, heads, block, dim = got.shape
    return got.transpose(0, 1).reshape(1, heads, n * block, dim)[:, :, :ctx]


def _causal_tail(q_len: int, ctx: int, device) -> torch.Tensor | None:
    """Mask for q_len new tokens at the end of a ctx-token context (None when nothing is hidden)."""
    if q_len == 1:
        return None
    rows = torch.arange(ctx - q_len, ctx, device=device).unsqueeze(1)
    return torch.arange(ctx, device=device).unsqueeze(0) <= rows


def resolve_backend(mode: AttentionMode, device: torch.device) -> AttentionBackend:
    """The backend a step uses for `mode` on `device`; "cpu_kernel" asked for where it cannot run
    is an error that says why."""
    from worker import kernels

    if mode == "sdpa":
        return "sdpa"
    usable: dict[str, bool] = {
        "cpu_kernel": device.type == "cpu" and kernels.load(),
        "triton": device.type == "cuda" and _triton_importable(),
    }
    if mode != "auto":
        if not usable[mode]:
            raise ValueError(f'attention "{mode}" is not available on {device.type} here; use "auto" or "sdpa"')
        return mode
    return next((name for name, ok in usable.items() if ok), "sdpa")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return step.attend(module.layer_idx, query, key, value, scale), None


AttentionInterface.register(ATTN_NAME, paged_attention)
# Outside a step the model is plain SDPA, so it needs SDPA's masks (e.g. padded batches in generate()).
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
