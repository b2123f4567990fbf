"""Everything the dashboard shows, read from the Redis index alone.

So the dashboard runs anywhere it can reach Redis and keeps working when a
worker (or the router) dies: a dead worker keeps its counters and shows as
not alive; its lease age says for how long it has been silent.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from cache_store import MetadataIndex
from cache_store import counter_names as cn
from cache_store.counter_names import (
    MISS_REASONS,
    ROUTER,
    LeaseField,
    disk_summary,
    miss_tokens,
    parse_tenant_counter,
)
from cache_store.index import Lease, entry_generation
from cache_store.tree import DEVICE, DISK, HOST
from cluster.service.history import window_rates
from cluster.service.stats import ratio, summarize

TENANT_ROWS = 50


def collect(index: MetadataIndex, *, history: int = 360, top: int = 15) -> dict[str, Any]:
    """One snapshot for /api/stats, /metrics and the page. Raises IndexUnavailable."""
    now = time.time()
    worker_ids = index.workers()
    leases = index.leases()
    counters = index.counters([*worker_ids, ROUTER])
    router = counters.pop(ROUTER, {})
    info = index.service_info()
    summary = summarize(counters)
    workers = [_worker_row(w, leases.get(w), summary["per_worker"].get(w, {}), now) for w in worker_ids]
    top_rows = _top_prefixes(index, leases, top)
    counts = index.block_counts()
    samples = index.history(history)
    return {
        "service": index.config.service,
        "time": now,
        "index_available": True,
        "model": {k: info.get(k) for k in ("model", "fingerprint", "block_size", "policy", "routers")},
        "workers_alive": sum(w["alive"] for w in workers),
        # cluster-wide: copies held vs different blocks; the gap is capacity spent on duplicates
        "blocks": {"stored": counts.stored, "distinct": counts.distinct, "duplicates": counts.duplicates},
        "totals": {**summary["totals"], "compute_saved_s": sum((w["compute_saved_s"] for w in workers), 0.0)},
        "workers": workers,
        "per_worker_counters": summary["per_worker"],
        "misses": {r: int(router.get(miss_tokens(r), 0)) for r in MISS_REASONS},
        "router": {k: v for k, v in router.items() if parse_tenant_counter(k) is None},
        "tenants": _tenant_rows(router),
        "top_prefixes": top_rows,
        "history": window_rates(samples),
        "history_cumulative": [
            {"t": s["t"], "hit_rate": ratio(s[cn.CACHED_TOKENS], s[cn.PROMPT_TOKENS])} for s in samples
        ],
    }


def _worker_row(worker_id: str, lease: Lease | None, c: Mapping[str, Any], now: float) -> dict[str, Any]:
    """One worker: liveness and gauges from its lease (none once it died), totals from its counters."""
    fields = lease.fields if lease else {}
    us_per_token = float(fields.get(LeaseField.PREFILL_US_PER_TOKEN, 0) or 0)
    block_bytes = int(fields.get(LeaseField.BLOCK_BYTES, 0) or 0)
    return {
        "worker_id": worker_id,
        "alive": lease is not None,
        "lease_age_s": round(now - float(fields[LeaseField.HEARTBEAT]), 1) if LeaseField.HEARTBEAT in fields else None,
        "generation": lease.generation if lease else None,
        "device": fields.get(LeaseField.DEVICE, ""),
        "queue": int(fields.get(LeaseField.QUEUE, 0) or 0),
        "served": int(fields.get(LeaseField.SERVED, 0) or 0),
        "requests": c.get(cn.REQUESTS, 0),
        "hit_rate": c.get("hit_rate", 0.0),
        "request_hit_rate": c.get("request_hit_rate", 0.0),
        "cached_tokens": c.get(cn.CACHED_TOKENS, 0),
        "evictions": c.get("evictions", 0),
        "mean_ttft_s": c.get("mean_ttft_s", 0.0),
        "compute_saved_s": c.get(cn.CACHED_TOKENS, 0) * us_per_token / 1e6,
        "tiers": {
            **{tier: _tier(fields, tier, block_bytes) for tier in (DEVICE, HOST)},
            DISK: _disk_tier(fields),
        },
        "disk": disk_summary(
            c,
            int(fields.get(LeaseField.DISK_BYTES, 0) or 0),
            int(fields.get(LeaseField.DISK_CAPACITY_BYTES, 0) or 0),
        ),
    }


def _tier(fields: Mapping[str, str], tier: str, block_bytes: int) -> dict[str, int]:
    blocks = int(fields.get(LeaseField.blocks(tier), 0) or 0)
    capacity = int(fields.get(LeaseField.capacity(tier), 0) or 0)
    return {
        "blocks": blocks,
        "capacity": capacity,
        "bytes": blocks * block_bytes,
        "capacity_bytes": capacity * block_bytes,
    }


def _disk_tier(fields: Mapping[str, str]) -> dict[str, int]:
    """The disk tier's occupancy; its bytes are its slots' (headers and padding included), as its
    files take them on disk. Capacity 0: no disk tier."""
    return {
        "blocks": int(fields.get(LeaseField.blocks(DISK), 0) or 0),
        "capacity": int(fields.get(LeaseField.capacity(DISK), 0) or 0),
        "bytes": int(fields.get(LeaseField.DISK_BYTES, 0) or 0),
        "capacity_bytes": int(fields.get(LeaseField.DISK_CAPACITY_BYTES, 0) or 0),
    }


def _tenant_rows(router: Mapping[str, int]) -> list[dict[str, Any]]:
    """Per-tenant request counters from the router's, busiest tenants first."""
    tenants: dict[str, dict[str, int]] = defaultdict(dict)
    for key, value in router.items():
        parsed = parse_tenant_counter(key)
        if parsed is not None:
            tenant, name = parsed
            tenants[tenant][name] = int(value)
    rows = (
        {"tenant": t, **v, "hit_rate": ratio(v.get(cn.CACHED_TOKENS, 0), v.get(cn.PROMPT_TOKENS, 0))}
        for t, v in tenants.items()
    )
    return sorted(rows, key=lambda r: -r.get(cn.REQUESTS, 0))[:TENANT_ROWS]


def _top_prefixes(index: MetadataIndex, leases: Mapping[str, Lease], n: int) -> list[dict[str, Any]]:
    """The most-hit prefixes, each with the live workers (current generation) holding its last block."""
    prefixes = index.top_prefixes(n)
    entries = index.holders_of([p[0] for p in prefixes])
    pinned = index.pinned()
    return [
        {
            "hash": hx[:12],
            "tokens": tokens,
            "tenant": tenant,
            "hits": hits,
            "holders": sorted(
                w for w, v in entries.get(hx, {}).items() if w in leases and entry_generation(v) == leases[w].generation
            ),
            "pinned": hx in pinned,
        }
        for hx, tokens, tenant, hits in prefixes
    ]
