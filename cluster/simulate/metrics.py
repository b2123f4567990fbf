"""What one simulated run reports, and how it is computed from the run's outcomes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

from cache_store.counter_names import miss_reason

# Why a request cached fewer blocks than it did in the one-shared-cache run (token-weighted), judged by
# the simulator at the request's start from the whole cluster's state (exact, unlike the router's view):
LOST_ELSEWHERE = "held_elsewhere"  # another worker held them: a turn placed away from its holder, no fetch
LOST_EVICTED = "evicted"  # some worker held them once, none does now (capacity, or copies pushing them out)
LOST_IN_FLIGHT = "in_flight"  # no worker had computed them yet (the bound serves each request at arrival)
LOSSES = (LOST_ELSEWHERE, LOST_EVICTED, LOST_IN_FLIGHT)


class Outcome(NamedTuple):
    index: int  # the request's position in the trace
    worker_id: str
    prompt_tokens: int
    cached_tokens: int  # as the engine counts them: local + fetched blocks, the last token always recomputed
    local_blocks: int
    fetched_blocks: int
    ttft_s: float


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    requests: int
    prompt_tokens: int
    hit_rate: float  # cached prompt tokens / prompt tokens
    vs_shared: float | None  # hit_rate / one_shared_cache's (filled in by the caller)
    load_imbalance: float  # max / mean busy time over workers (1.0 = perfectly even)
    ttft_p50_s: float
    ttft_p99_s: float
    peer_fetches: int
    fetched_blocks: int
    stored_blocks: int  # block copies held cluster-wide at the end
    distinct_blocks: int  # different blocks among them
    duplicate_blocks_mean: float  # stored - distinct, averaged over arrivals
    miss_tokens: dict[str, int]  # the router's reasons: held_elsewhere, evicted, never_seen
    # Tokens cached in the one-shared-cache run but not in this one, by LOSSES (empty for the bound itself)
    lost_vs_shared: dict[str, int]
    # Requests the router placed on a worker holding less of the prompt than the best holder, with no
    # fetch named (load spills, or a new worker chosen for its empty cache), and the blocks it gave up
    placed_off_holder: int
    off_holder_blocks: int
    placements: dict[str, int]  # the router's placement reasons (cache, load, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def summarize(policy: str, sim) -> PolicyResult:
    out = sim.outcomes
    prompt = sum(o.prompt_tokens for o in out)
    busy = list(sim.busy_s.values())
    mean_busy = sum(busy) / len(busy)
    ttfts = [o.ttft_s for o in out]
    counters: dict[str, int] = {}
    for router in sim.routers:
        for k, v in router.counters.snapshot().items():
            counters[k] = counters.get(k, 0) + v
    dup = sim.duplicate_samples
    return PolicyResult(
        policy=policy,
        requests=len(out),
        prompt_tokens=prompt,
        hit_rate=sum(o.cached_tokens for o in out) / prompt if prompt else 0.0,
        vs_shared=None,
        load_imbalance=max(busy) / mean_busy if mean_busy > 0 else 1.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        peer_fetches=sum(1 for o in out if o.fetched_blocks),
        fetched_blocks=sum(o.fetched_blocks for o in out),
        stored_blocks=sim.index.stored,
        distinct_blocks=sim.index.distinct,
        duplicate_blocks_mean=sum(dup) / len(dup) if dup else 0.0,
        miss_tokens={miss_reason(k): v for k, v in counters.items() if miss_reason(k) is not None},
        lost_vs_shared=dict(sim.lost),
        placed_off_holder=sim.off_holder,
        off_holder_blocks=sim.off_holder_blocks,
        placements={k.removeprefix("placement_"): v for k, v in counters.items() if k.startswith("placement_")},
    )
