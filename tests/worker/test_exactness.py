"""The first promise: generation with the cache equals generation without it.

For the demo model and tiny Llama / Qwen2 / Mistral / Gemma models in float32:
greedy tokens identical to plain `transformers` generate, last-position
logits within 1e-4, for every cached length and every tier, and
`cached_tokens` equal to the prompt tokens the model did not process.
"""

from __future__ import annotations

import pytest
import torch

from cache_store import CacheConfig, KVShape
from worker import kernels
from worker.engine import Engine, EngineConfig
from worker.linear import auto_linear, packed_available
from worker.models import load_model
from worker.request import Request

from .reference import check, check_logits, check_run, rand_ids

MODELS = ["demo", "llama", "qwen2", "mistral", "gemma"]


def make_engine(
    tiny_dirs, name, *, device_blocks=256, host_blocks=256, block_size=None, attention="auto", linear="auto"
) -> Engine:
    path = "demo" if name == "demo" else str(tiny_dirs[name])
    loaded = load_model(path, torch.device("cpu"), torch.float32)
    bs = block_size or (CacheConfig.block_size if name == "demo" else 8)
    lay = loaded.layout
    block_bytes = KVShape(lay.layers, lay.kv_heads, bs, lay.head_dim, torch.float32).block_bytes
    cfg = CacheConfig(block_size=bs, device_bytes=device_blocks * block_bytes, host_bytes=host_blocks * block_bytes)
    config = EngineConfig(attention=attention, linear=linear)
    return Engine(loaded, cfg, device=torch.device("cpu"), engine_config=config)


@pytest.mark.parametrize("name", MODELS)
def test_every_cached_length(tiny_dirs, name):
    engine = make_engine(tiny_dirs, name)
    bs = engine.block_size
    w = rand_ids(3 * bs + 5, seed=1)
    check(engine, w, 0)  # cold
    x = [(t + 1) % 256 for t in w]  # differs from w at every position
    check(engine, w[: 2 * bs - 1] + x[2 * bs - 1 : 3 * bs], bs)  # one token short of a block boundary
    check(engine, w[: 2 * bs] + x[2 * bs : 3 * bs + 2], 2 * bs)  # exactly on a block boundary
    check(engine, w, 3 * bs)  # all full blocks cached, partial tail recomputed
    r = check(engine, w[: 3 * bs], 3 * bs - 1)  # whole prompt cached: the last token is recomputed
    assert r.cached_device_tokens == 3 * bs - 1
    check(engine, rand_ids(2 * bs + 3, seed=2), 0)  # unrelated prompt: no hit


@pytest.mark.parametrize("name", ["demo", "llama"])
@pytest.mark.parametrize("linear", ["packed", "plain"])
def test_every_cached_length_with_the_other_linear_layers(tiny_dirs, name, linear):
    """oneDNN's packed layout and MKL's alone ("plain") keep the promise too; "auto" runs our GEMM
    where it builds, else oneDNN's."""
    assert make_engine(tiny_dirs, name).info()["linear"] == auto_linear(torch.device("cpu"), torch.float32)
    if linear == "packed" and not packed_available():
        pytest.skip("this torch has no oneDNN")
    engine = make_engine(tiny_dirs, name, linear=linear)
    assert engine.info()["linear"] == linear
    check_three_cached_lengths(engine)


@pytest.mark.parametrize("name", ["demo", "llama"])
def test_every_cached_length_with_the_sdpa_fallback(tiny_dirs, name):
    """The fallback (no compiler on the machine) keeps the same promise; "auto" picks the kernel on CPU."""
    assert make_engine(tiny_dirs, name).info()["attention"] == ("cpu_kernel" if kernels.load() else "sdpa")
    engine = make_engine(tiny_dirs, name, attention="sdpa")
    assert engine.info()["attention"] == "sdpa"
    check_three_cached_lengths(engine)


def check_three_cached_lengths(engine):
    """Cold, a hit ending on a block boundary, the whole prompt cached."""
    bs = engine.block_size
    w = rand_ids(3 * bs + 5, seed=1)
    check(engine, w, 0)
    check(engine, w[: 2 * bs] + [(t + 1) % 256 for t in w[2 * bs : 3 * bs + 2]], 2 * bs)
    check(engine, w[: 3 * bs], 3 * bs - 1)


@pytest.mark.parametrize("name", MODELS)
def test_host_tier_after_spill(tiny_dirs, name):
    engine = make_engine(tiny_dirs, name, device_blocks=4, host_blocks=64)
    bs = engine.block_size
    w = rand_ids(3 * bs + 2, seed=3)
    check(engine, w, 0)
    for s in (4, 5):
        check(engine, rand_ids(3 * bs + 2, seed=s), 0)  # pushes w's blocks to the host tier
    assert engine.store.stats().counters["spilled_blocks"] >= 3
    assert check_logits(engine, w, 3 * bs)["host"] > 0  # read from host (and promoted)
    for s in (14, 15):
        check(engine, rand_ids(3 * bs + 2, seed=s), 0)  # back to host
    r = check_run(engine, w, 3 * bs)
    assert r.cached_host_tokens > 0
    assert r.cached_host_tokens + r.cached_device_tokens == 3 * bs


@pytest.mark.parametrize("name", MODELS)
def test_after_eviction_recomputes(tiny_dirs, name):
    engine = make_engine(tiny_dirs, name, device_blocks=4, host_blocks=0)
    bs = engine.block_size
    w = rand_ids(3 * bs + 2, seed=6)
    check(engine, w, 0)
    for s in (7, 8):
        check(engine, rand_ids(3 * bs + 2, seed=s), 0)
    assert engine.store.stats().counters["dropped_blocks_device"] > 0
    check(engine, w, 0)
    engine.store.check_invariants()


@pytest.mark.parametrize("name", ["demo", "llama"])
def test_multi_turn_hits_up_to_the_new_text(tiny_dirs, name):
    engine = make_engine(tiny_dirs, name)
    bs = engine.block_size
    turn1 = rand_ids(2 * bs + 3, seed=9)
    r1 = check(engine, turn1, 0)
    turn2 = turn1 + list(r1.token_ids) + rand_ids(bs + 1, seed=10)
    computed = len(turn1) + len(r1.token_ids) - 1  # the last generated token's KV is never computed
    check(engine, turn2, (computed // bs) * bs)


def test_salt_never_hits_another_tenant(tiny_dirs):
    engine = make_engine(tiny_dirs, "llama")
    bs = engine.block_size
    w = rand_ids(3 * bs + 1, seed=11)
    check(engine, w, 0, cache_salt="tenant-a")
    check(engine, w, 0, cache_salt="tenant-b")
    check(engine, w, 0)
    check(engine, w, 3 * bs, cache_salt="tenant-a")


def test_different_models_never_share_hashes(tiny_dirs):
    a, b = make_engine(tiny_dirs, "llama"), make_engine(tiny_dirs, "qwen2")
    ids = rand_ids(40, seed=12)
    assert a.fingerprint != b.fingerprint
    assert not set(a.chain(ids)) & set(b.chain(ids))


def test_seeded_sampling_is_the_same_cold_and_warm(tiny_dirs):
    engine = make_engine(tiny_dirs, "demo")
    ids = rand_ids(40, seed=13)
    req = Request(ids, max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    cold = engine.run(req)
    warm = engine.run(req)
    assert cold.cached_tokens == 0 and warm.cached_tokens == 32
    assert cold.token_ids == warm.token_ids
    other_seed = engine.run(Request(ids, max_new_tokens=12, temperature=0.9, seed=99))
    assert other_seed.token_ids != cold.token_ids
