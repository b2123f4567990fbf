"""Peer fetch that fails (timeout, dead peer, wrong tokens, wrong shape) and caches far smaller than the workload:
outputs stay identical to a cold run and nothing failed counts as a hit."""

from __future__ import annotations

import os
import random
import signal

import pytest
import ray
import torch

from cache_store import CacheConfig, Exported
from worker.actor import NAMESPACE, WorkerActor, worker_actor_name
from worker.demo_model import demo_block_bytes
from worker.engine import Engine, PeerFetchError, PeerHint
from worker.models import load_model
from worker.request import Request

from .reference import reference

CFG = CacheConfig(device_bytes=64 * demo_block_bytes(), host_bytes=0)
BS = CFG.block_size


@pytest.fixture(scope="module")
def loaded():
    return load_model("demo", torch.device("cpu"), torch.float32)


def engine_with(loaded, fetcher=None, cfg=CFG):
    e = Engine(loaded, cfg, device=torch.device("cpu"), worker_id="b", peer_fetcher=fetcher)
    e.costs = e.costs.with_transfer(1e-6, 1e-6)  # fetching always pays: exercise the path
    return e


PROMPT = "A prefix that lives on the peer and is pulled from there. " * 4


def test_fetched_blocks_are_exact_and_counted(loaded):
    peer = engine_with(loaded)
    peer.generate([PROMPT], max_new_tokens=1)
    b = engine_with(loaded, lambda wid, hashes: peer.export_blocks(hashes))
    n = len(PROMPT) // BS
    r = b.run(Request(PROMPT, max_new_tokens=8), hint=PeerHint("a", n))
    cold, _ = reference(b, b.tokenize(PROMPT), 8)
    assert r.token_ids == cold
    assert r.cached_peer_tokens == r.cached_tokens == n * BS
    assert b.counters.get("peer_fetches") == 1


@pytest.mark.parametrize("fault", ["wrong tokens", "wrong shape", "peer error", "empty answer"])
def test_a_bad_peer_means_recompute(loaded, fault):
    peer = engine_with(loaded)
    peer.generate([PROMPT], max_new_tokens=1)

    def fetch(wid, hashes):
        ex = peer.export_blocks(hashes)
        if fault == "wrong tokens":  # what a corrupt or confused peer could send
            return Exported(ex.hashes, [tuple((t + 1) % 256 for t in toks) for toks in ex.tokens], ex.kv)
        if fault == "wrong shape":
            return Exported(ex.hashes, ex.tokens, ex.kv[:, :, :, :1])
        if fault == "peer error":
            raise PeerFetchError("timed out after 10 s")
        return Exported([], [], ex.kv[:0])

    b = engine_with(loaded, fetch)
    r = b.run(Request(PROMPT, max_new_tokens=8), hint=PeerHint("a", len(PROMPT) // BS))
    cold, _ = reference(b, b.tokenize(PROMPT), 8)
    assert r.ok and r.token_ids == cold
    assert r.cached_tokens == 0 and r.cached_peer_tokens == 0
    c = b.counters.snapshot()
    assert c.get("peer_fetches", 0) == 0
    if fault == "wrong tokens":
        assert c["peer_fetch_mismatches"] == 1
    if fault in ("wrong shape", "peer error"):
        assert c["peer_fetch_failures"] == 1
    b.store.check_invariants()


@pytest.mark.parametrize("fault", ["peer too slow", "peer died"])
def test_a_failed_fetch_through_ray_recomputes(ray_local, valkey, fault):
    """The real path: two worker actors, the fetch goes through Ray. A peer that answers too late, or
    whose process is gone (SIGKILL, no restart), costs a recompute: same tokens, nothing counted as hit."""
    service = "peer-" + fault.replace(" ", "-")
    cache = {"block_size": BS, "device_bytes": 8 << 20, "host_bytes": 0, "service": service}
    holder = WorkerActor.options(name=worker_actor_name(service, "p0"), namespace=NAMESPACE, num_cpus=1).remote(
        "p0", "demo", cache, redis_url=valkey.url
    )
    timeout_s = 1e-4 if fault == "peer too slow" else 30.0
    fetcher = WorkerActor.options(name=worker_actor_name(service, "p1"), namespace=NAMESPACE, num_cpus=1).remote(
        "p1", "demo", cache, redis_url=valkey.url, peer_timeout_s=timeout_s
    )
    try:
        ray.get(fetcher.calibrate.remote("p0"))
        cold = ray.get(holder.generate.remote(Request(PROMPT, max_new_tokens=6).to_dict()))
        if fault == "peer died":
            os.kill(ray.get(holder.health.remote())["pid"], signal.SIGKILL)
        hint = ("p0", len(PROMPT) // BS)
        r = ray.get(fetcher.generate.remote(Request(PROMPT, max_new_tokens=6).to_dict(), None, hint))
        assert r["error"] is None and r["token_ids"] == cold["token_ids"]
        assert r["cached_tokens"] == 0 and r["cached_peer_tokens"] == 0
        counters = ray.get(fetcher.stats.remote())["counters"]
        assert counters["peer_fetch_failures"] == 1 and counters.get("peer_fetches", 0) == 0
    finally:
        ray.get(fetcher.shutdown.remote())
        for h in (holder, fetcher):
            ray.kill(h)


def test_memory_pressure_keeps_budgets_and_exact_outputs(loaded):
    """Device 12 blocks (running requests need up to 10), host 6; 40 requests over ~30 distinct prompts of 4-9 blocks."""
    cfg = CacheConfig(device_bytes=12 * demo_block_bytes(), host_bytes=6 * demo_block_bytes())
    e = Engine(loaded, cfg, device=torch.device("cpu"))
    rng = random.Random(3)
    systems = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(60, 140))) for _ in range(5)]
    for i in range(40):
        prompt = rng.choice(systems) + f" question {i} " + "x" * rng.randint(1, 20)
        r = e.run(Request(prompt, max_new_tokens=4))
        cold, _ = reference(e, e.tokenize(prompt), 4)
        assert r.ok and r.token_ids == cold, i
        s = e.store.stats()
        assert s.device.blocks + e.store.working_blocks <= 12 and s.host.blocks <= 6
        e.store.check_invariants()
    c = e.stats()["counters"]  # the store's block counters and the engine's request counters
    assert c["spilled_blocks"] > 0 and c["dropped_blocks_host"] > 0 and c["hit_requests"] > 0
    assert e.store.stats().device.pinned == 0  # nothing leaked a pin
