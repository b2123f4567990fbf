"""Turning raw counters into the numbers people read: hit rates, tokens saved, per worker.

Hit rate is token-weighted (prompt tokens served from cache / prompt tokens)
unless named `request_hit_rate` (requests with any cached token / requests).
Both come from the same monotonic counters the workers flush to the index,
so the dashboard, `Cluster.stats()` and the demo table agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from cache_store import counter_names as cn
from cache_store.counter_names import DROP_TIERS, SUMMED, dropped_blocks


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def worker_summary(c: Mapping[str, int]) -> dict[str, float]:
    out = {k: int(c.get(k, 0)) for k in SUMMED}
    out["hit_rate"] = ratio(out[cn.CACHED_TOKENS], out[cn.PROMPT_TOKENS])
    out["request_hit_rate"] = ratio(out[cn.HIT_REQUESTS], out[cn.REQUESTS])
    out["mean_ttft_s"] = ratio(out[cn.TTFT_US_SUM] / 1e6, out[cn.REQUESTS])
    out["evictions"] = out[cn.SPILLED_BLOCKS] + sum(out[dropped_blocks(t)] for t in DROP_TIERS)
    return out


def summarize(counters: Mapping[str, Mapping[str, int]]) -> dict:
    total: Counter[str] = Counter()
    for c in counters.values():
        total.update({k: int(v) for k, v in c.items()})
    return {
        "totals": worker_summary(total),
        "per_worker": {w: worker_summary(c) for w, c in sorted(counters.items())},
    }
