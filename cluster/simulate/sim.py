"""One simulation: every requested placement policy on the same trace, plus the one-shared-cache bound."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from cache_store import CacheConfig
from cluster.routing.policies import POLICIES
from cluster.simulate.metrics import PolicyResult, summarize
from cluster.simulate.run import cached_blocks, prepare, run_policy, simulate_policy
from cluster.simulate.timing import INSTANT, TimeModel
from cluster.simulate.trace import TraceRequest

BOUND = "one_shared_cache"
POLICY_NAMES = tuple(POLICIES)  # the router's policies, by their one home


def simulate(
    trace: Sequence[TraceRequest],
    *,
    workers: int,
    capacity_blocks: int,
    policies: Sequence[str] = POLICY_NAMES,
    time: TimeModel | None = None,
    eviction: str = CacheConfig.eviction,
    duplicates_first: bool = True,
    routers: int = 1,
    affinity: str = "prefix",
) -> dict[str, PolicyResult]:
    """Results keyed by policy name, `one_shared_cache` included; `vs_shared` filled in."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(POLICIES)}")
    if workers < 1 or capacity_blocks < 1 or routers < 1:
        raise ValueError("workers, capacity_blocks and routers must be >= 1")
    time = time or TimeModel()
    requests = prepare(trace)
    bound_sim = run_policy(requests, 1, workers * capacity_blocks, "round_robin", INSTANT, eviction)
    bound = summarize(BOUND, bound_sim)
    results = {BOUND: replace(bound, ttft_p50_s=0.0, ttft_p99_s=0.0, load_imbalance=1.0, placements={})}
    bound_blocks = cached_blocks(bound_sim, len(requests))
    for name in policies:
        results[name] = simulate_policy(
            requests, workers, capacity_blocks, name, time, eviction, duplicates_first, routers, affinity, bound_blocks
        )
    shared = results[BOUND].hit_rate
    return {k: replace(r, vs_shared=r.hit_rate / shared if shared else None) for k, r in results.items()}
