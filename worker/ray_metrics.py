"""Worker counters through `ray.util.metrics`, so they show up wherever Ray's metrics go
(Ray's Prometheus endpoint adds the `ray_` prefix: ray_prefixcache_requests_total, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge

from cache_store.counter_names import DEVICE, HOST, PEER, LeaseField
from worker.request import Result


class RayMetrics:
    def __init__(self, service: str, worker_id: str):
        self.tags = {"service": service, "worker": worker_id}
        w, wt = ("service", "worker"), ("service", "worker", "tier")
        self.requests = Counter("prefixcache_requests", "Requests served", tag_keys=w)
        self.errors = Counter("prefixcache_request_errors", "Requests answered with an error", tag_keys=w)
        self.prompt = Counter("prefixcache_prompt_tokens", "Prompt tokens received", tag_keys=w)
        self.cached = Counter("prefixcache_cached_tokens", "Prompt tokens served from cache", tag_keys=wt)
        self.generated = Counter("prefixcache_generated_tokens", "Tokens generated", tag_keys=w)
        self.ttft = Gauge("prefixcache_last_ttft_seconds", "Time to first token of the last request", tag_keys=w)
        self.blocks = Gauge("prefixcache_cache_blocks", "KV blocks held", tag_keys=wt)
        self.queue = Gauge("prefixcache_queue_depth", "Requests queued or running", tag_keys=w)

    def observe(self, r: Result) -> None:
        if not r.ok:
            self.errors.inc(1, tags=self.tags)
            return
        self.requests.inc(1, tags=self.tags)
        self.prompt.inc(r.prompt_tokens, tags=self.tags)
        self.generated.inc(len(r.token_ids), tags=self.tags)
        self.ttft.set(r.ttft_s, tags=self.tags)
        for tier, n in (
            (DEVICE, r.cached_device_tokens),
            (HOST, r.cached_host_tokens),
            (PEER, r.cached_peer_tokens),
        ):
            if n:
                self.cached.inc(n, tags={**self.tags, "tier": tier})

    def gauges(self, g: Mapping[str, object], queue: int) -> None:
        self.queue.set(queue, tags=self.tags)
        for tier in (DEVICE, HOST):
            self.blocks.set(float(g.get(LeaseField.blocks(tier), 0)), tags={**self.tags, "tier": tier})
