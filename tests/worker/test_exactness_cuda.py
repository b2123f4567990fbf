"""The first promise on a GPU: pools on the device, host tier in pinned memory, non-blocking copies.

float32: last-position logits within 1e-4 of a plain forward, from the device tier and from the
host tier after a spill. bfloat16: greedy tokens identical to plain `generate()` on the test prompts.
Skipped where torch sees no CUDA device (the GPU machine runs them; see BENCHMARKS.md, GPU).
"""

from __future__ import annotations

import pytest
import torch

from cache_store import CacheConfig, KVShape
from worker.engine import Engine
from worker.models import load_model
from worker.request import Request

from .reference import ATOL, N_NEW, rand_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
BS = CacheConfig.block_size


def cuda_engine(dtype: torch.dtype, device_blocks: int, host_blocks: int) -> Engine:
    loaded = load_model("demo", CUDA, dtype)
    lay = loaded.layout
    block_bytes = KVShape(lay.layers, lay.kv_heads, BS, lay.head_dim, dtype).block_bytes
    cfg = CacheConfig(block_size=BS, device_bytes=device_blocks * block_bytes, host_bytes=host_blocks * block_bytes)
    return Engine(loaded, cfg, device=CUDA)


@torch.no_grad()
def plain(engine: Engine, ids: list[int], n_new: int = N_NEW):
    x = torch.tensor([ids], device=CUDA)
    out = engine.model.generate(x, max_new_tokens=n_new, do_sample=False, pad_token_id=258)
    return tuple(out[0, len(ids) :].tolist()), engine.model(x).logits[0, -1].float().cpu()


def test_pools_live_on_the_gpu_and_host_tier_is_pinned():
    e = cuda_engine(torch.float32, device_blocks=8, host_blocks=8)
    assert e.store.device_pool.data.is_cuda
    assert e.store.host_pool.data.is_pinned()


@pytest.mark.parametrize("cached_blocks", [1, 3])
def test_float32_logits_from_the_device_tier(cached_blocks):
    e = cuda_engine(torch.float32, device_blocks=64, host_blocks=0)
    ids = rand_ids(cached_blocks * BS + 5, seed=cached_blocks)
    e.run(Request(ids[: cached_blocks * BS], max_new_tokens=0))
    _, ref = plain(e, ids, 1)
    logits, by_tier = e.prefill_logits(ids)
    assert by_tier["device"] == cached_blocks * BS
    assert torch.allclose(logits, ref, atol=ATOL, rtol=0), (logits - ref).abs().max()


def test_float32_logits_from_the_host_tier_after_a_spill():
    e = cuda_engine(torch.float32, device_blocks=4, host_blocks=64)
    w = rand_ids(3 * BS + 3, seed=11)
    e.run(Request(w, max_new_tokens=0))
    for s in range(3):
        e.run(Request(rand_ids(3 * BS + 2, seed=100 + s), max_new_tokens=0))  # spills w to host
    _, ref = plain(e, w, 1)
    logits, by_tier = e.prefill_logits(w)
    assert by_tier["host"] > 0
    assert torch.allclose(logits, ref, atol=ATOL, rtol=0), (logits - ref).abs().max()


@pytest.mark.parametrize("seed", range(4))
def test_bfloat16_greedy_tokens_identical(seed):
    e = cuda_engine(torch.bfloat16, device_blocks=256, host_blocks=256)
    system = rand_ids(4 * BS, seed=1000)
    ids = system + rand_ids(7 + seed, seed=seed)
    e.run(Request(system, max_new_tokens=0))  # the shared prefix is cached
    ref_tokens, _ = plain(e, ids)
    r = e.run(Request(ids, max_new_tokens=N_NEW))
    assert r.ok and r.cached_tokens == 4 * BS
    assert r.token_ids == ref_tokens
