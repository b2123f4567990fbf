"""The CUDA paged attention kernel (Triton) against SDPA on the same blocks; run by
test_triton_paged.py (on CPU in a process of its own under `TRITON_INTERPRET=1`, which must be set
before anything imports triton; on a GPU compiled, with PREFIXCACHE_TRITON_DEVICE=cuda)."""

import os

import pytest
import torch

DEVICE = os.environ.get("PREFIXCACHE_TRITON_DEVICE", "cpu")

from tests.worker.test_paged_attention import BS, batch, reference  # noqa: E402
from worker.kernels import triton_paged  # noqa: E402

CASES = {
    "decodes": ([1, 17, 70, 33, 16], [1, 1, 1, 1, 1]),
    "mixed chunks": ([90, 40, 16, 31], [20, 1, 16, 7]),
    "whole prompt": ([45], [45]),
}


# Triton's interpreter computes bfloat16 dots on the raw bits (numpy has no bfloat16): half stands in on CPU.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim, heads, kv_heads", [(64, 9, 3), (24, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, HALF])
def test_triton_kernel_matches_sdpa(case, dim, heads, kv_heads, dtype):
    ctxs, qlens = CASES[case]
    pool, q, tables, ctx, starts, qls = batch(ctxs, qlens, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype)
    want = reference(pool, 1, q, tables, ctx, starts, qls, dim**-0.5)
    dev = torch.device(DEVICE)
    out = torch.full((q.shape[1], heads, dim), float("nan"), dtype=dtype, device=dev)
    args = [t.to(dev) for t in (q, pool, tables, ctx, starts, qls)]
    triton_paged.paged_attention(out, args[0], args[1], 1, *args[2:], dim**-0.5, max(qlens))
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    got = out.float().cpu()
    assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()
    assert BS == pool.shape[4]
