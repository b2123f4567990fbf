"""Soak: concurrent clients for a bounded time; zero failures, flat worker memory, steady hit rate.

PREFIXCACHE_SOAK_S sets the duration (default 40 s; RELIABILITY.md reports a longer run)."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
import ray

from cluster import Cluster
from cluster.bench.workload import shared_prompts
from worker.actor import NAMESPACE, worker_actor_name

SOAK_S = float(os.environ.get("PREFIXCACHE_SOAK_S", "40"))
CLIENTS = 4
WARMUP_S = min(10.0, SOAK_S / 4)


def rss_mb(pids):
    return sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20


@pytest.mark.slow
def test_soak(ray_local):
    c = Cluster.start(workers=2, service="t-soak", device_cache_gb=0.03, host_cache_gb=0.03)
    try:
        pids = [
            ray.get(ray.get_actor(worker_actor_name("t-soak", w), namespace=NAMESPACE).health.remote())["pid"]
            for w in c.config["workers"]
        ]
        wl = shared_prompts(4000, 6, min_chars=300, max_chars=700, question_chars=24, max_new_tokens=8, seed=9)
        log: list[tuple[float, bool, int, int]] = []  # (time, ok, cached, prompt)
        lock = threading.Lock()
        start = time.monotonic()
        stop = start + SOAK_S
        rss = {}

        def client(k):
            i = k
            while time.monotonic() < stop:
                [r] = c.run([wl.requests[i % len(wl.requests)]])
                with lock:
                    log.append((time.monotonic() - start, r.ok, r.cached_tokens, r.prompt_tokens))
                i += CLIENTS

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(WARMUP_S)
        rss["warm"] = rss_mb(pids)
        for t in threads:
            t.join(SOAK_S + 120)
        rss["end"] = rss_mb(pids)

        def hit_rate(lo, hi):
            rows = [x for x in log if lo <= x[0] < hi]
            return sum(x[2] for x in rows) / max(1, sum(x[3] for x in rows))

        mid = WARMUP_S + (SOAK_S - WARMUP_S) / 2
        first, second = hit_rate(WARMUP_S, mid), hit_rate(mid, SOAK_S + 120)
        failed = sum(not x[1] for x in log)
        print(
            f"\nsoak: {CLIENTS} clients x {SOAK_S:.0f}s, {len(log)} requests ({len(log) / SOAK_S:.1f}/s), "
            f"{failed} failed; worker RSS {rss['warm']:.0f} MB after warm-up -> {rss['end']:.0f} MB at end; "
            f"hit rate {first:.1%} (first half) / {second:.1%} (second half)"
        )
        assert failed == 0
        assert rss["end"] <= rss["warm"] * 1.15 + 64
        assert abs(first - second) < 0.15
        assert first > 0.5
    finally:
        c.shutdown()
