"""Paged attention on CUDA in Triton: one launch per layer for the whole ragged batch, keys and
values read in place from the pool's blocks through each request's block table.

Same contract as the CPU op (`paged_attention_cpu.cpp`): pool [capacity, layers, 2, kv_heads,
block_size, head_dim]; q [heads, T, head_dim] (any strides); out [T, heads, head_dim]; per request
b: block table row, context length after the step, first query row, query rows. Query row i of a
request with q_len rows sits at position ctx - q_len + i and sees keys [0, ctx - q_len + i].

Grid: (request, kv head, tile of query rows). A program holds BLOCK_M query rows x the kv head's
group of query heads as one tile of query vectors, walks the context BLOCK_N keys at a time
(gathered through the block table) and folds each tile into an online softmax in float32. Decode
steps are tiles of one row; a prefill chunk is several tiles. `TRITON_INTERPRET=1` runs the same
code on CPU tensors (what the CPU test suite does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, pool_ptr, tables_ptr, ctx_ptr, qstart_ptr, qlen_ptr,
    scale, layer,
    s_qh, s_qt, s_qd,
    s_ot, s_oh,
    s_blk, s_layer, s_kv, s_head,
    s_tab,
    GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    g = tl.program_id(1)
    tile = tl.program_id(2)
    q_len = tl.load(qlen_ptr + b)
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    q0 = tl.load(qstart_ptr + b)
    vec = tl.arange(0, BLOCK_V)  # query vectors of this tile: (row, head in group)
    row = tile * BLOCK_M + vec // GROUP
    head = g * GROUP + vec % GROUP
    live = (vec < BLOCK_M * GROUP) & (row < q_len)
    dims = tl.arange(0, D_PAD)
    in_dim = dims < D
    q = tl.load(
        q_ptr + head[:, None] * s_qh + (q0 + row)[:, None] * s_qt + dims[None, :] * s_qd,
        mask=live[:, None] & in_dim[None, :],
        other=0.0,
    ).to(pool_ptr.dtype.element_ty)
    last = ctx - q_len + row  # last key position each vector sees
    m_i = tl.full([BLOCK_V], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_V], tl.float32)
    acc = tl.zeros([BLOCK_V, D_PAD], tl.float32)
    base = pool_ptr + layer * s_layer + g * s_head
    end = tl.minimum(ctx, ctx - q_len + tile * BLOCK_M + BLOCK_M)  # keys no row of this tile sees are skipped
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        in_ctx = keys < ctx
        page = tl.load(tables_ptr + b * s_tab + keys // BS, mask=in_ctx, other=0)
        addr = base + page.to(tl.int64) * s_blk + (keys % BS) * D
        kv_mask = in_ctx[:, None] & in_dim[None, :]
        k = tl.load(addr[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(addr[:, None] + s_kv + dims[None, :], mask=kv_mask, other=0.0)
        if FP32:  # full float32 products: TF32 would move logits by ~1e-3 (invariant 1 allows 1e-4)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        visible = (keys[None, :] <= last[:, None]) & in_ctx[None, :] & live[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o = out_ptr + (q0 + row)[:, None] * s_ot + head[:, None] * s_oh + dims[None, :]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=live[:, None] & in_dim[None, :])


def paged_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    pool: torch.Tensor,
    layer: int,
    tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
) -> None:
    """Fill `out` [T, heads, dim] for the requests given (see the module docstring for shapes);
    `max_q_len` (a host int, the longest query of the call) sizes the grid."""
    heads, _, dim = q.shape
    kv_heads, bs = pool.shape[3], pool.shape[4]
    group = heads // kv_heads
    block_m = 1 if max_q_len == 1 else 16
    block_v = max(16, triton.next_power_of_2(block_m * group))  # tl.dot needs tiles of >= 16
    grid = (ctx_lens.shape[0], kv_heads, triton.cdiv(max_q_len, block_m))
    _paged_attention_kernel[grid](
        out, q, pool, tables, ctx_lens, q_starts, q_lens,
        scale, layer,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1),
        pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3),
        tables.stride(0),
        GROUP=group, BS=bs, D=dim, D_PAD=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_N=max(16, bs), FP32=pool.dtype == torch.float32,
    )  # fmt: skip
