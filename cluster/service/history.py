"""The hit-rate history: cluster totals sampled into the index's capped stream.

The router samples every few seconds; the dashboard samples too when the
router has been silent, so the chart keeps moving without it. Samples are
cumulative, so consecutive ones give per-interval rates.
"""

from __future__ import annotations

import time
from typing import Any

from cache_store import MetadataIndex
from cache_store.counter_names import CACHED_TOKENS, HIT_REQUESTS, PROMPT_TOKENS, REQUEST_COUNTERS, REQUESTS
from cluster.service.stats import ratio, summarize


def history_sample(totals: dict[str, Any], now: float | None = None) -> dict[str, float]:
    return {"t": now if now is not None else time.time(), **{k: totals.get(k, 0) for k in REQUEST_COUNTERS}}


def record_history(index: MetadataIndex) -> None:
    """Append the cluster's cumulative totals to the history stream."""
    workers = index.workers()
    totals = summarize(index.counters(workers))["totals"]
    index.append_history(history_sample(totals))


def window_rates(samples: list[dict[str, float]]) -> list[dict[str, float | None]]:
    """Per-interval hit rates between consecutive cumulative samples (None when nothing happened).
    A counter that went down (service restarted under the same name) starts a new run."""
    out = []
    for prev, cur in zip(samples, samples[1:]):
        d = {k: cur[k] - prev[k] for k in REQUEST_COUNTERS}
        if any(v < 0 for v in d.values()):
            continue
        out.append(
            {
                "t": cur["t"],
                "hit_rate": ratio(d[CACHED_TOKENS], d[PROMPT_TOKENS]) if d[PROMPT_TOKENS] else None,
                "request_hit_rate": ratio(d[HIT_REQUESTS], d[REQUESTS]) if d[REQUESTS] else None,
                "requests": d[REQUESTS],
            }
        )
    return out
