"""Cluster hit rate: cache-aware routing over per-worker caches vs one big cache vs round robin."""

from __future__ import annotations

import random

from cache_store import GIB
from cluster import Cluster
from cluster.bench.workload import text, zipf_choices
from worker.demo_model import demo_block_bytes
from worker.request import Request


def workload(salt: str) -> list[Request]:
    """6 system prompts of exactly 8 blocks, Zipf popularity, a 20-byte question each."""
    rng = random.Random(5)
    prompts = [f"[sys {i}] " + text(128 - 8, rng) for i in range(6)]
    assert all(len(p) == 128 for p in prompts)
    picks = zipf_choices(60, 6, 1.0, rng)
    return [
        Request(prompts[p] + f"Q{i:03d}: " + text(14, rng), max_new_tokens=1, cache_salt=salt)
        for i, p in enumerate(picks)
    ]


def hit_rate(cluster: Cluster, reqs: list[Request]) -> float:
    results = [cluster.run([r])[0] for r in reqs]  # one at a time: placement is deterministic
    assert all(r.ok for r in results)
    return sum(r.cached_tokens for r in results) / sum(r.prompt_tokens for r in results)


def test_cache_aware_matches_one_big_cache_and_beats_round_robin(ray_local):
    per_worker = 28 * demo_block_bytes() / GIB  # 28 blocks: about half of the 48 prompt blocks
    one = Cluster.start(workers=1, service="t-one", device_cache_gb=2 * per_worker, host_cache_gb=0)
    try:
        single = hit_rate(one, workload("single"))
    finally:
        one.shutdown()
    two = Cluster.start(workers=2, service="t-two", device_cache_gb=per_worker, host_cache_gb=0)
    try:
        aware = hit_rate(two, workload("aware"))
        two.set_policy("round_robin")
        rr = hit_rate(two, workload("rr"))
    finally:
        two.shutdown()
    print(f"\nhit rate: one worker with both caches {single:.1%}, cache_aware {aware:.1%}, round_robin {rr:.1%}")
    assert aware >= 0.9 * single
    assert rr < aware - 0.05
