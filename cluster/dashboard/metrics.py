"""Prometheus text exposition of a dashboard snapshot, with the standard prometheus_client library.

Counters are the workers' own monotonic totals (so rates work across
dashboard restarts); gauges are tier occupancy, queue depth and liveness.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cache_store import counter_names as cn
from cache_store.counter_names import HIT_TIERS, hit_tokens

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_WORKER_COUNTERS = {
    cn.REQUESTS: ("requests", "Requests served"),
    cn.HIT_REQUESTS: ("hit_requests", "Requests with at least one cached prompt token"),
    cn.PROMPT_TOKENS: ("prompt_tokens", "Prompt tokens received"),
    cn.PREFILL_TOKENS: ("prefill_tokens", "Prompt tokens computed (not served from cache)"),
    cn.GENERATED_TOKENS: ("generated_tokens", "Tokens generated"),
    "evictions": ("evicted_blocks", "Blocks spilled to host or dropped"),
    cn.AUDIT_CHECKED: ("audit_checked", "Cache hits re-computed without the cache by the audit"),
    cn.AUDIT_MISMATCHES: ("audit_mismatches", "Audited hits whose logits differed (expected 0)"),
    cn.DISK_READ_BLOCKS: ("disk_hit_blocks", "Blocks served from the disk tier (checksums good)"),
    cn.DISK_READ_BYTES: ("disk_read_bytes", "Bytes read by the disk tier"),
    cn.DISK_WRITE_BYTES: ("disk_write_bytes", "Bytes written by the disk tier"),
    cn.DISK_WRITES_DROPPED: ("disk_writes_dropped", "Blocks that left memory unwritten (the disk was slow or full)"),
    cn.DISK_WRITE_ERRORS: ("disk_write_errors", "Disk tier writes the OS refused"),
    cn.DISK_CORRUPT_SLOTS: ("disk_corrupt_slots", "Disk slots whose checksum failed when read (served as misses)"),
}
# Seconds spent in the disk tier's read and write calls: rate(bytes) / rate(seconds) is its bandwidth.
_DISK_SECONDS = {
    cn.DISK_READ_US: ("disk_read_seconds", "Time spent in disk tier reads"),
    cn.DISK_WRITE_US: ("disk_write_seconds", "Time spent in disk tier writes"),
}


class _SnapshotCollector:
    def __init__(self, snapshot: dict[str, Any] | None):
        self.snapshot = snapshot

    def collect(self):
        up = GaugeMetricFamily("prefixcache_index_up", "1 if the Redis index answered this scrape")
        up.add_metric([], 1.0 if self.snapshot else 0.0)
        yield up
        s = self.snapshot
        if not s:
            return
        yield from _worker_counters(s)
        yield from _block_gauges(s.get("blocks", {}))
        yield from _worker_gauges(s["workers"])
        yield from _cluster_families(s)


def _worker_counters(s: dict[str, Any]):
    """Each worker's monotonic totals, as Prometheus counters."""
    per_worker = {w["worker_id"]: w for w in s["workers"]}
    counters = {
        k: CounterMetricFamily(f"prefixcache_{name}", text, labels=["worker"])
        for k, (name, text) in _WORKER_COUNTERS.items()
    }
    cached = CounterMetricFamily(
        "prefixcache_cached_tokens", "Prompt tokens served from cache", labels=["worker", "tier"]
    )
    ttft = CounterMetricFamily(
        "prefixcache_ttft_seconds", "Sum of time to first token (divide by requests)", labels=["worker"]
    )
    saved = CounterMetricFamily(
        "prefixcache_prefill_seconds_saved", "Prefill compute time the cache saved", labels=["worker"]
    )
    seconds = {
        k: CounterMetricFamily(f"prefixcache_{name}", text, labels=["worker"])
        for k, (name, text) in _DISK_SECONDS.items()
    }
    for w, c in s["per_worker_counters"].items():
        for k, fam in counters.items():
            fam.add_metric([w], c.get(k, 0))
        for k, fam in seconds.items():
            fam.add_metric([w], c.get(k, 0) / 1e6)
        for tier in HIT_TIERS:
            cached.add_metric([w, tier], c.get(hit_tokens(tier), 0))
        ttft.add_metric([w], c.get(cn.TTFT_US_SUM, 0) / 1e6)
        saved.add_metric([w], per_worker.get(w, {}).get("compute_saved_s", 0.0))
    yield from counters.values()
    yield from seconds.values()
    yield from (cached, ttft, saved)


def _worker_gauges(workers: list[dict[str, Any]]):
    """Liveness, queue depth and tier occupancy of each worker (from its lease)."""
    alive = GaugeMetricFamily("prefixcache_worker_up", "1 while the worker holds its lease", labels=["worker"])
    queue = GaugeMetricFamily("prefixcache_queue_depth", "Requests queued or running on the worker", labels=["worker"])
    blocks = GaugeMetricFamily("prefixcache_cache_blocks", "KV blocks held", labels=["worker", "tier"])
    capacity = GaugeMetricFamily("prefixcache_cache_capacity_blocks", "KV block capacity", labels=["worker", "tier"])
    used = GaugeMetricFamily("prefixcache_cache_bytes", "KV bytes held", labels=["worker", "tier"])
    budget = GaugeMetricFamily("prefixcache_cache_capacity_bytes", "KV byte budget", labels=["worker", "tier"])
    for w in workers:
        alive.add_metric([w["worker_id"]], 1.0 if w["alive"] else 0.0)
        queue.add_metric([w["worker_id"]], w["queue"])
        for tier, t in w["tiers"].items():
            blocks.add_metric([w["worker_id"], tier], t["blocks"])
            capacity.add_metric([w["worker_id"], tier], t["capacity"])
            used.add_metric([w["worker_id"], tier], t["bytes"])
            budget.add_metric([w["worker_id"], tier], t["capacity_bytes"])
    yield from (alive, queue, blocks, capacity, used, budget)


def _cluster_families(s: dict[str, Any]):
    """Cluster hit ratios, miss reasons and per-tenant numbers (the router's view)."""
    ratio = GaugeMetricFamily("prefixcache_hit_ratio", "Cluster hit rate since start", labels=["weight"])
    ratio.add_metric(["tokens"], s["totals"]["hit_rate"])
    ratio.add_metric(["requests"], s["totals"]["request_hit_rate"])
    yield ratio
    misses = CounterMetricFamily("prefixcache_miss_tokens", "Uncached prompt tokens by reason", labels=["reason"])
    for reason, n in s["misses"].items():
        misses.add_metric([reason], n)
    yield misses
    tenant_req = CounterMetricFamily("prefixcache_tenant_requests", "Requests per tenant (hashed)", labels=["tenant"])
    tenant_hit = GaugeMetricFamily(
        "prefixcache_tenant_hit_ratio", "Token hit rate per tenant (hashed)", labels=["tenant"]
    )
    for t in s["tenants"]:
        tenant_req.add_metric([t["tenant"]], t.get(cn.REQUESTS, 0))
        tenant_hit.add_metric([t["tenant"]], t["hit_rate"])
    yield from (tenant_req, tenant_hit)


def render(snapshot: dict[str, Any] | None) -> bytes:
    registry = CollectorRegistry()
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


def _block_gauges(blocks: dict[str, int]):
    """Cluster-wide block copies vs distinct blocks (from the index's exact counters)."""
    for key, text in (
        ("stored", "KV block copies held cluster-wide (every worker's, all tiers)"),
        ("distinct", "Different KV blocks held cluster-wide"),
    ):
        g = GaugeMetricFamily(f"prefixcache_blocks_{key}", text)
        g.add_metric([], blocks.get(key, 0))
        yield g
