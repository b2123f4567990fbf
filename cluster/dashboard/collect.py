"""Everything the dashboard shows, read from the Redis index alone.

So the dashboard runs anywhere it can reach Redis and keeps working when a
worker (or the router) dies: a dead worker keeps its counters and shows as
not alive; its lease age says for how long it has been silent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from cache_store import MetadataIndex
from cluster.stats import ratio, summarize

HISTORY_FIELDS = ("requests", "hit_requests", "prompt_tokens", "cached_tokens")
MISS_REASONS = ("never_seen", "evicted", "held_elsewhere")


def history_sample(totals: dict[str, Any], now: float | None = None) -> dict[str, float]:
    return {"t": now if now is not None else time.time(), **{k: totals.get(k, 0) for k in HISTORY_FIELDS}}


def record_history(index: MetadataIndex) -> None:
    """Append the cluster's cumulative totals to the history stream (the router does this every few seconds)."""
    workers = index.workers()
    totals = summarize(index.counters(workers))["totals"]
    index.append_history(history_sample(totals))


def window_rates(samples: list[dict[str, float]]) -> list[dict[str, float | None]]:
    """Per-interval hit rates between consecutive cumulative samples (None when nothing happened).
    A counter that went down (service restarted under the same name) starts a new run."""
    out = []
    for prev, cur in zip(samples, samples[1:]):
        d = {k: cur[k] - prev[k] for k in HISTORY_FIELDS}
        if any(v < 0 for v in d.values()):
            continue
        out.append(
            {
                "t": cur["t"],
                "hit_rate": ratio(d["cached_tokens"], d["prompt_tokens"]) if d["prompt_tokens"] else None,
                "request_hit_rate": ratio(d["hit_requests"], d["requests"]) if d["requests"] else None,
                "requests": d["requests"],
            }
        )
    return out


def collect(index: MetadataIndex, *, history: int = 360, top: int = 15) -> dict[str, Any]:
    """One snapshot for /api/stats, /metrics and the page. Raises IndexUnavailable."""
    now = time.time()
    worker_ids = index.workers()
    leases = index.leases()
    counters = index.counters([*worker_ids, "router"])
    router = counters.pop("router", {})
    info = index.service_info()
    summary = summarize(counters)
    workers = []
    compute_saved = 0.0
    for w in worker_ids:
        lease = leases.get(w)
        fields = lease.fields if lease else {}
        c = summary["per_worker"].get(w, {})
        us_per_token = float(fields.get("prefill_us_per_token", 0) or 0)
        saved_s = c.get("cached_tokens", 0) * us_per_token / 1e6
        compute_saved += saved_s
        block_bytes = int(fields.get("block_bytes", 0) or 0)
        workers.append(
            {
                "worker_id": w,
                "alive": lease is not None,
                "lease_age_s": round(now - float(fields["hb"]), 1) if "hb" in fields else None,
                "generation": lease.generation if lease else None,
                "device": fields.get("device", ""),
                "queue": int(fields.get("queue", 0) or 0),
                "served": int(fields.get("served", 0) or 0),
                "requests": c.get("requests", 0),
                "hit_rate": c.get("hit_rate", 0.0),
                "request_hit_rate": c.get("request_hit_rate", 0.0),
                "cached_tokens": c.get("cached_tokens", 0),
                "evictions": c.get("evictions", 0),
                "mean_ttft_s": c.get("mean_ttft_s", 0.0),
                "compute_saved_s": saved_s,
                "tiers": {
                    tier: {
                        "blocks": int(fields.get(f"{tier}_blocks", 0) or 0),
                        "capacity": int(fields.get(f"{tier}_capacity", 0) or 0),
                        "bytes": int(fields.get(f"{tier}_blocks", 0) or 0) * block_bytes,
                        "capacity_bytes": int(fields.get(f"{tier}_capacity", 0) or 0) * block_bytes,
                    }
                    for tier in ("device", "host")
                },
            }
        )
    totals = {**summary["totals"], "compute_saved_s": compute_saved}
    misses = {r: int(router.get(f"miss_tokens_{r}", 0)) for r in MISS_REASONS}
    tenants: dict[str, dict[str, int]] = defaultdict(dict)
    for key, value in router.items():
        if key.startswith("t."):
            _, tenant, name = key.split(".", 2)
            tenants[tenant][name] = int(value)
    tenant_rows = sorted(
        (
            {"tenant": t, **v, "hit_rate": ratio(v.get("cached_tokens", 0), v.get("prompt_tokens", 0))}
            for t, v in tenants.items()
        ),
        key=lambda r: -r.get("requests", 0),
    )[:50]
    prefixes = index.top_prefixes(top)
    entries = index.holders_of([p[0] for p in prefixes])
    pinned = index.pinned()
    top_rows = [
        {
            "hash": hx[:12],
            "tokens": tokens,
            "tenant": tenant,
            "hits": hits,
            "holders": sorted(
                w for w, v in entries.get(hx, {}).items() if w in leases and v.startswith(f"{leases[w].generation}:")
            ),
            "pinned": hx in pinned,
        }
        for hx, tokens, tenant, hits in prefixes
    ]
    counts = index.block_counts()
    samples = index.history(history)
    return {
        "service": index.config.service,
        "time": now,
        "index_available": True,
        "model": {k: info.get(k) for k in ("model", "fingerprint", "block_size", "policy")},
        "workers_alive": sum(w["alive"] for w in workers),
        # cluster-wide: copies held vs different blocks; the gap is capacity spent on duplicates
        "blocks": {"stored": counts.stored, "distinct": counts.distinct, "duplicates": counts.duplicates},
        "totals": totals,
        "workers": workers,
        "per_worker_counters": summary["per_worker"],
        "misses": misses,
        "router": {k: v for k, v in router.items() if not k.startswith("t.")},
        "tenants": tenant_rows,
        "top_prefixes": top_rows,
        "history": window_rates(samples),
        "history_cumulative": [
            {"t": s["t"], "hit_rate": ratio(s["cached_tokens"], s["prompt_tokens"])} for s in samples
        ],
    }
