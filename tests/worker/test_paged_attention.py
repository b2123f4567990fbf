"""The CPU paged attention op against SDPA on the same blocks: ragged batches, partial blocks,
chunks of several rows (causal), grouped-query heads, float32 and bfloat16 pools, strided queries."""

import pytest
import torch
import torch.nn.functional as F

from worker import kernels

pytestmark = pytest.mark.skipif(not kernels.load(), reason="the CPU kernel cannot be built here (no g++/ninja)")
BS = 16


def reference(pool, layer, q, tables, ctx_lens, q_starts, q_lens, scale):
    """[T, heads, dim] by SDPA, one request at a time over a copy of its context."""
    heads, T, dim = q.shape
    out = torch.zeros(T, heads, dim)
    for b in range(len(ctx_lens)):
        ctx, q0, ql = int(ctx_lens[b]), int(q_starts[b]), int(q_lens[b])
        blocks = tables[b, : -(-ctx // BS)].long()
        kv = pool[blocks, layer].float()  # [n, 2, kv_heads, bs, dim]
        k = kv[:, 0].permute(1, 0, 2, 3).reshape(kv.shape[2], -1, dim)[:, :ctx]
        v = kv[:, 1].permute(1, 0, 2, 3).reshape(kv.shape[2], -1, dim)[:, :ctx]
        mask = torch.arange(ctx)[None] <= torch.arange(ctx - ql, ctx)[:, None]
        qq = q[:, q0 : q0 + ql].float()
        got = F.scaled_dot_product_attention(qq[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)
        out[q0 : q0 + ql] = got[0].transpose(0, 1)
    return out


def batch(ctxs, qlens, *, heads, kv_heads, dim, dtype, layers=3, capacity=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(capacity, layers, 2, kv_heads, BS, dim, generator=g).to(dtype)
    perm = torch.randperm(capacity, generator=g)
    width = max(-(-c // BS) for c in ctxs)
    tables = torch.full((len(ctxs), width), -1, dtype=torch.int32)
    used = 0
    for b, c in enumerate(ctxs):
        n = -(-c // BS)
        tables[b, :n] = perm[used : used + n].int()
        used += n
    starts = torch.tensor([sum(qlens[:b]) for b in range(len(qlens))], dtype=torch.int32)
    T = sum(qlens)
    q = torch.randn(T, heads, dim, generator=g).to(dtype).transpose(0, 1)  # [heads, T, dim], strided like the model's
    return pool, q, tables, torch.tensor(ctxs, dtype=torch.int32), starts, torch.tensor(qlens, dtype=torch.int32)


CASES = {
    "decodes": ([1, 17, 520, 33, 16], [1, 1, 1, 1, 1]),
    "mixed chunks": ([700, 40, 16, 31], [64, 1, 16, 7]),
    "whole prompt": ([45], [45]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim", [64, 32])  # 64 takes the vectorized path on AVX-512 machines
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_sdpa(case, dim, dtype):
    ctxs, qlens = CASES[case]
    pool, q, tables, ctx, starts, qls = batch(ctxs, qlens, heads=9, kv_heads=3, dim=dim, dtype=dtype)
    out = torch.full((q.shape[1], 9, dim), float("nan"), dtype=dtype)
    torch.ops.prefixcache.paged_attention(out, q, pool, 1, tables, ctx, starts, qls, dim**-0.5)
    want = reference(pool, 1, q, tables, ctx, starts, qls, dim**-0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), want, atol=tol, rtol=0), (out.float() - want).abs().max()


def test_a_subset_of_requests_leaves_the_other_rows_alone():
    pool, q, tables, ctx, starts, qls = batch([50, 60, 70], [3, 2, 4], heads=4, kv_heads=2, dim=64, dtype=torch.float32)
    out = torch.zeros(q.shape[1], 4, 64)
    pick = torch.tensor([0, 2])
    args = (tables[pick].contiguous(), ctx[pick], starts[pick], qls[pick])
    torch.ops.prefixcache.paged_attention(out, q, pool, 0, *args, 0.125)
    want = reference(pool, 0, q, tables, ctx, starts, qls, 0.125)
    assert torch.allclose(out[:3], want[:3], atol=2e-5) and torch.allclose(out[5:], want[5:], atol=2e-5)
    assert torch.equal(out[3:5], torch.zeros(2, 4, 64))  # request 1's rows: not touched


@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 9, 3), (64, 8, 2), (128, 8, 2), (64, 3, 3)])
def test_a_request_gets_the_same_bits_alone_and_in_any_batch(dim, heads, kv_heads):
    """Invariant 1 at the kernel: a request's rows do not depend on who shares its step, in which
    order, or whether its blocks are shared with them (tile height, task order and shared blocks
    change no row's arithmetic)."""
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(120, 2, 2, kv_heads, BS, dim, generator=g)
    shared = torch.arange(0, 20, dtype=torch.int32)  # a 20-block prefix held by requests 0-3
    own = [torch.arange(20 + 4 * b, 24 + 4 * b, dtype=torch.int32) for b in range(6)]
    firsts = [shared, shared, shared, shared[:7], torch.arange(60, 80, dtype=torch.int32), shared]
    tables = torch.stack(
        [torch.cat([f, o, torch.full((24 - len(f) - len(o),), -1, dtype=torch.int32)]) for f, o in zip(firsts, own)]
    )
    ctxs = [len(f) * BS + n for f, n in zip(firsts, [1, 5, 16, 40, 33, 64])]
    qlens = [1, 1, 3, 9, 1, 20]  # decodes and chunks (causal rows) side by side
    q = torch.randn(sum(qlens), heads, dim, generator=g).transpose(0, 1)
    starts = [sum(qlens[:b]) for b in range(6)]

    def run(order):
        out = torch.zeros(q.shape[1], heads, dim)
        i = torch.tensor(order)
        torch.ops.prefixcache.paged_attention(
            out,
            q,
            pool,
            1,
            tables[i].contiguous(),
            torch.tensor(ctxs, dtype=torch.int32)[i],
            torch.tensor(starts, dtype=torch.int32)[i],
            torch.tensor(qlens, dtype=torch.int32)[i],
            dim**-0.5,
        )
        return out

    together, reordered = run(range(6)), run([5, 3, 1, 0, 4, 2])
    assert torch.equal(together, reordered)
    for b in range(6):
        rows = slice(starts[b], starts[b] + qlens[b])
        assert torch.equal(run([b])[rows], together[rows]), f"request {b}"
    want = reference(pool, 1, q, tables, torch.tensor(ctxs), torch.tensor(starts), torch.tensor(qlens), dim**-0.5)
    assert torch.allclose(together, want, atol=2e-5, rtol=0)


def test_write_kv_puts_each_token_in_its_slot():
    pool = torch.zeros(8, 2, 2, 3, BS, 64)
    k = torch.randn(5, 3, 64).transpose(0, 1)  # [kv_heads, T, dim], strided
    v = torch.randn(5, 3, 64).transpose(0, 1)
    slots = torch.tensor([5 * BS + 0, 5 * BS + 1, 2 * BS + 15, 7 * BS + 3, 0], dtype=torch.long)
    torch.ops.prefixcache.write_kv(pool, 1, k, v, slots)
    for t, s in enumerate(slots.tolist()):
        assert torch.equal(pool[s // BS, 1, 0, :, s % BS], k[:, t]) and torch.equal(
            pool[s // BS, 1, 1, :, s % BS], v[:, t]
        )
    assert pool[:, 0].abs().sum() == 0  # the other layer is untouched
    assert int((pool[:, 1] != 0).any(dim=-1).sum()) == 2 * 3 * 5


def test_a_prompt_gets_the_same_bits_in_one_call_and_in_any_chunking():
    """A 150-row prefill (split inside the op into runs of rows across threads) against the same
    rows fed as chunks of 1, 37 and 112 rows: the bits of every row agree, and match SDPA."""
    pool, q, tables, _, _, _ = batch([40 + 150], [150], heads=9, kv_heads=3, dim=64, dtype=torch.float32)

    def rows(lo, hi):  # rows [lo, hi) of the prompt, the context through row hi - 1
        out = torch.zeros(hi - lo, 9, 64)
        args = [torch.tensor([x], dtype=torch.int32) for x in (40 + hi, 0, hi - lo)]
        torch.ops.prefixcache.paged_attention(out, q[:, lo:hi], pool, 2, tables, *args, 0.125)
        return out

    whole = rows(0, 150)
    assert torch.equal(torch.cat([rows(0, 1), rows(1, 38), rows(38, 150)]), whole)
    args = (torch.tensor([190]), torch.tensor([0]), torch.tensor([150]))
    want = reference(pool, 2, q, tables, *args, 0.125)
    assert torch.allclose(whole, want, atol=2e-5, rtol=0)
