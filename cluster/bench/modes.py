"""Service modes, driven through the Cluster client: (c) per-worker caches behind round robin,
(d) this service, (e) this service with a device tier too small to hold the working set."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from cluster.bench.inproc import Sample
from cluster.bench.workload import chats
from cluster.service.client import Cluster
from worker.request import Request, Result


def run_through(
    cluster: Cluster, requests: Sequence[Request], concurrency: int
) -> tuple[list[Sample], list[Result], float]:
    """Send requests with `concurrency` in flight. Per request: TTFT inside the worker (queue excluded),
    latency at the client (queue and Ray included). Returns samples, results (in order) and wall time."""
    results: list[Result | None] = [None] * len(requests)
    samples: list[Sample | None] = [None] * len(requests)
    next_i = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            t0 = time.perf_counter()
            [r] = cluster.run([requests[i]])
            results[i], samples[i] = r, _sample(r, time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(max(1, min(concurrency, len(requests))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    failed = [r.error for r in results if r is None or not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark requests failed, e.g. {failed[0]}")
    return samples, results, wall  # type: ignore[return-value]


def run_chats(cluster: Cluster, n_chats: int, turns: int, *, salt: str, max_new_tokens: int, seed: int):
    """All chats' turn t run together; each turn's prompt extends the previous turn and its answer."""
    samples: list[Sample] = []

    def turn(reqs: list[Request]) -> list[Result]:
        got, results, _ = run_through(cluster, reqs, len(reqs))
        samples.extend(got)
        return results

    t0 = time.perf_counter()
    for _ in chats(turn, n_chats, turns, max_new_tokens=max_new_tokens, seed=seed, cache_salt=salt):
        pass
    return samples, time.perf_counter() - t0


def _sample(r: Result, client_latency: float) -> Sample:
    return Sample(r.ttft_s, client_latency, r.prompt_tokens, r.cached_tokens, len(r.token_ids), r.queue_s)


def tier_bytes(cluster: Cluster) -> dict[str, int]:
    workers = cluster.stats()["workers"].values()
    return {
        "device": sum(w.get("device_tier", {}).get("bytes_used", 0) for w in workers),
        "host": sum(w.get("host_tier", {}).get("bytes_used", 0) for w in workers),
    }
