"""Turning raw counters into the numbers people read: hit rates, tokens saved, per worker.

Hit rate is token-weighted (prompt tokens served from cache / prompt tokens)
unless named `request_hit_rate` (requests with any cached token / requests).
Both come from the same monotonic counters the workers flush to the index,
so the dashboard, `Cluster.stats()` and the demo table agree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

SUMMED = (
    "requests",
    "hit_requests",
    "rejected_requests",
    "prompt_tokens",
    "cached_tokens",
    "prefill_tokens",
    "generated_tokens",
    "hit_tokens_device",
    "hit_tokens_host",
    "hit_tokens_peer",
    "spilled_blocks",
    "dropped_blocks_device",
    "dropped_blocks_host",
    "promoted_blocks",
    "inserted_blocks",
    "peer_fetches",
    "peer_fetch_failures",
    "peer_fetched_blocks",
    "ttft_us_sum",
    "audit_checked",
    "audit_mismatches",
)


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def worker_summary(c: Mapping[str, int]) -> dict[str, float]:
    out = {k: int(c.get(k, 0)) for k in SUMMED}
    out["hit_rate"] = ratio(out["cached_tokens"], out["prompt_tokens"])
    out["request_hit_rate"] = ratio(out["hit_requests"], out["requests"])
    out["mean_ttft_s"] = ratio(out["ttft_us_sum"] / 1e6, out["requests"])
    out["evictions"] = out["spilled_blocks"] + out["dropped_blocks_device"] + out["dropped_blocks_host"]
    return out


def summarize(counters: Mapping[str, Mapping[str, int]]) -> dict:
    total: Counter[str] = Counter()
    for c in counters.values():
        total.update({k: int(v) for k, v in c.items()})
    return {
        "totals": worker_summary(total),
        "per_worker": {w: worker_summary(c) for w, c in sorted(counters.items())},
    }
