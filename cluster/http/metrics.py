"""Prometheus metrics on the API port (`GET /metrics`, where vLLM and SGLang serve theirs and where
load generators such as aiperf look for them).

One exposition in two parts. The request metrics of this ingress process: requests by endpoint and
status, tokens, time to first token, inter-token and end-to-end latency histograms; they live in
this process's registry (an ingress replica is one process; a restarted replica starts from zero,
which Prometheus reads as a counter reset). And the cluster's cache metrics from the Redis index
(cached tokens by worker and tier, hit ratios, occupancy, miss reasons), rendered by the
dashboard's own code from the same kind of snapshot the dashboard shows, so both say the same.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cache_store import CacheConfig, MetadataIndex
from cluster.dashboard import metrics as cluster_metrics
from cluster.dashboard.snapshots import Snapshots
from cluster.http.errors import status_of
from cluster.http.schema import DOCS_URL, OPENAPI_URL, endpoints
from worker.request import ErrorKind, Result

CONTENT_TYPE = cluster_metrics.CONTENT_TYPE
SNAPSHOT_REFRESH_S = 2.0  # scrapes within it share one read of the index
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4, 0.8, 2.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
CLIENT_GONE = status_of(ErrorKind.CANCELLED)  # the status counted for a client that closed the connection first
OTHER = "other"  # the endpoint label of paths the API does not have (bounded label values)


class RequestMetrics:
    """One process's request metrics (`REQUESTS` below: the ingress replica's)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ep = ["endpoint"]
        self.requests = Counter("prefixcache_http_requests", "HTTP requests answered", [*ep, "status"], registry=r)
        self.running = Gauge("prefixcache_http_requests_running", "HTTP requests being answered", ep, registry=r)
        self.prompt_tokens = Counter(
            "prefixcache_http_prompt_tokens", "Prompt tokens of answered requests", ep, registry=r
        )
        self.cached_tokens = Counter(
            "prefixcache_http_cached_tokens",
            "Prompt tokens served from the cache (usage.cached_tokens)",
            ep,
            registry=r,
        )
        self.completion_tokens = Counter("prefixcache_http_completion_tokens", "Tokens generated", ep, registry=r)
        self.ttft = Histogram(
            "prefixcache_http_time_to_first_token_seconds",
            "From the request reaching the API to its first generated token",
            ep,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "prefixcache_http_inter_token_latency_seconds",
            "Mean time between generated tokens, one observation per request of 2+ tokens",
            ep,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "prefixcache_http_request_latency_seconds",
            "From the request reaching the API to its last token",
            ep,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def generated(self, endpoint: str, result: Result, arrived: float, first_token: float | None) -> None:
        """One finished generation: its tokens and times. `first_token` is when its
        first text went out (streams); without it (one JSON answer) the first token's time is the
        end less the time the worker spent after the first token."""
        end = time.perf_counter()
        n = len(result.token_ids)
        self.prompt_tokens.labels(endpoint).inc(result.prompt_tokens)
        self.cached_tokens.labels(endpoint).inc(result.cached_tokens)
        self.completion_tokens.labels(endpoint).inc(n)
        self.latency.labels(endpoint).observe(end - arrived)
        if not n:
            return
        if first_token is None:
            decoding = result.latency_s - result.queue_s - result.ttft_s
            first_token = max(arrived, end - max(decoding, 0.0))
        self.ttft.labels(endpoint).observe(first_token - arrived)
        if n > 1:
            self.itl.labels(endpoint).observe((end - first_token) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


REQUESTS = RequestMetrics()


class Counting:
    """ASGI middleware: every answer counted by endpoint and status (errors included), and the
    requests being answered. The endpoint label is the route's path, or OTHER for paths the app
    does not have, so a scanner cannot grow the label set."""

    def __init__(self, app):
        self.app = app
        self._paths: frozenset[str] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = self._endpoint(scope)
        status: int | None = None

        async def noted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        running = REQUESTS.running.labels(endpoint)
        running.inc()
        try:
            await self.app(scope, receive, noted)
        except asyncio.CancelledError:  # the client went away before an answer started
            status = status or CLIENT_GONE
            raise
        finally:
            running.dec()
            REQUESTS.answered(endpoint, status or 500)  # no answer started: CatchAll sent a 500

    def _endpoint(self, scope) -> str:
        if self._paths is None:
            self._paths = frozenset({OPENAPI_URL, DOCS_URL, *(path for _, path in endpoints(scope["app"]))})
        return scope["path"] if scope["path"] in self._paths else OTHER


class ClusterMetrics:
    """The dashboard's metrics of one service, from its Redis index (read at most every
    SNAPSHOT_REFRESH_S). Blocking: call it off the event loop."""

    def __init__(self, redis_url: str, service: str):
        config = CacheConfig(service=service, redis_timeout_s=1.0, redis_retry_s=2.0)
        self.snapshots = Snapshots(MetadataIndex(redis_url, config), SNAPSHOT_REFRESH_S)

    def render(self) -> bytes:
        snapshot, _ = self.snapshots.get()
        return cluster_metrics.render(snapshot)  # with prefixcache_index_up 0 while Redis is away
