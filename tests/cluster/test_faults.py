"""Faults on a live local cluster: a worker SIGKILLed mid-load, Redis stopped and restarted."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import ray

from cache_store import CacheConfig, EmbeddedRedis, MetadataIndex, block_chain, root_hash
from cache_store.embedded import free_port
from cluster import Cluster
from cluster.dashboard.server import DashboardServer
from tests.polling import wait_for
from worker.actor import NAMESPACE, worker_actor_name

from .reference import greedy

N = 96  # new tokens per request in the SIGKILL test: long enough that the kill lands mid-generation
FAST = dict(lease_ttl_s=3.0, heartbeat_s=0.5, device_cache_gb=0.05, host_cache_gb=0.05)


def test_sigkilled_worker_requests_are_retried_elsewhere(ray_local):
    with EmbeddedRedis() as redis_srv:
        c = Cluster.start(workers=2, service="t-kill", redis_url=redis_srv.url, max_restarts=0, **FAST)
        try:
            system = "Prefix served before and after the crash. " * 8
            first = c.generate([system + "warm"], max_new_tokens=2)[0]
            victim = first.worker_id
            victim_actor = ray.get_actor(worker_actor_name("t-kill", victim), namespace=NAMESPACE)
            pid = ray.get(victim_actor.health.remote())["pid"]
            results = []
            thread = threading.Thread(
                target=lambda: results.extend(c.generate([system + f"user {i}" for i in range(10)], max_new_tokens=N))
            )
            thread.start()
            # Kill it while it is serving some of them (a fixed sleep raced the engine: all done before the kill).
            wait_for(lambda: ray.get(victim_actor.health.remote())["queue"] > 0, "requests on the victim", every=0.01)
            index = MetadataIndex(redis_srv.url, CacheConfig(service="t-kill"))
            chain = block_chain(root_hash(c.config["fingerprint"], None), list(system.encode()), 16)
            assert victim in {h.worker_id for h in index.holders(chain)}
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # Its index entries stop counting within the lease TTL (nobody cleans them up).
            wait_for(
                lambda: victim not in {h.worker_id for h in index.holders(chain)},
                "the dead worker's index entries to lapse",
                timeout=10,
                every=0.05,
            )
            gone_s = time.monotonic() - killed_at
            thread.join(timeout=180)
            assert len(results) == 10 and all(r.ok for r in results), [r.error for r in results]
            for i, r in enumerate(results):  # no request got another request's KV
                assert r.token_ids == greedy(system + f"user {i}", N), i
            retried = [r for r in results if r.extra["attempts"] > 1]
            assert retried and all(r.worker_id != victim for r in retried)
            assert c.stats()["router"]["retries"] >= len(retried)
            assert gone_s <= FAST["lease_ttl_s"] + 2 * FAST["heartbeat_s"] + 1.0
            print(
                f"\nSIGKILL mid-load: {len(results)}/10 requests completed, {len(retried)} retried on the "
                f"survivor, outputs equal to a cold run; the dead worker's blocks stopped counting in the index "
                f"{gone_s:.1f}s after the SIGKILL (lease TTL {FAST['lease_ttl_s']}s)"
            )
            # And the service keeps serving on the survivor.
            [after] = c.generate([system + "after"], max_new_tokens=2)
            assert after.ok and after.worker_id != victim
        finally:
            c.shutdown()


@pytest.mark.parametrize("keeps_data", [False, True], ids=["restarts-empty", "restarts-with-data"])
def test_redis_outage_degrades_then_recovers(ray_local, keeps_data):
    with EmbeddedRedis() as redis_srv:
        c = Cluster.start(workers=2, service="t-redis", redis_url=redis_srv.url, **FAST)
        dash = DashboardServer(redis_srv.url, service="t-redis", port=free_port(), refresh_s=0.2).start()
        try:
            system = "Prefix that survives a Redis outage. " * 8
            cold = c.generate([system + "q0"], max_new_tokens=4)[0]
            warm = c.generate([system + "q1"], max_new_tokens=4)[0]
            assert warm.extra["placement"] == "cache" and warm.cached_tokens > 0
            redis_srv.stop(save=keeps_data)
            t0 = time.monotonic()
            during = c.generate([system + f"q{i}" for i in range(2, 6)], max_new_tokens=4)
            outage_s = time.monotonic() - t0  # reported below, not asserted
            assert all(r.ok for r in during)
            assert {r.extra["placement"] for r in during} == {"fallback"}
            assert sum(r.cached_tokens > 0 for r in during) >= 1  # sticky fallback still finds a local cache
            status = urllib.request.urlopen(dash.url + "healthz").status
            try:
                urllib.request.urlopen(dash.url + "api/stats")
                raise AssertionError("the dashboard did not notice the outage")
            except urllib.error.HTTPError as e:
                assert status == 200 and e.code == 503 and json.loads(e.read())["index_available"] is False
            redis_srv.start()  # empty, or with the data saved at shutdown
            back = time.monotonic()
            index = MetadataIndex(redis_srv.url, CacheConfig(service="t-redis"))
            chain = block_chain(root_hash(c.config["fingerprint"], None), list(system.encode()), 16)
            wait_for(lambda: index.holders(chain), "the workers to re-publish", timeout=20)
            print(
                f"\nRedis down ({'kept' if keeps_data else 'lost'} its data): 4 requests served in {outage_s:.2f}s "
                f"from local caches ({sum(r.cached_tokens > 0 for r in during)} hits); index re-published "
                f"{time.monotonic() - back:.1f}s after Redis returned"
            )
            wait_for(
                lambda: c.generate([system + "back"], max_new_tokens=1)[0].extra["placement"] == "cache",
                "the router to place by cache again",
            )
            assert c.stats()["index_available"]
            assert all(r.token_ids == greedy(system + f"q{i}", 4) for i, r in enumerate(during, start=2))
            assert cold.token_ids == greedy(system + "q0", 4)
            assert urllib.request.urlopen(dash.url + "api/stats").status == 200
        finally:
            dash.stop()
            c.shutdown()


def test_restarted_worker_does_not_resurrect_its_old_entries(ray_local):
    with EmbeddedRedis() as redis_srv:
        c = Cluster.start(workers=2, service="t-restart", redis_url=redis_srv.url, max_restarts=1, **FAST)
        try:
            system = "Blocks a worker held before it was killed. " * 6
            [r] = c.generate([system + "a"], max_new_tokens=2)
            handle = ray.get_actor(worker_actor_name("t-restart", r.worker_id), namespace=NAMESPACE)
            before = ray.get(handle.health.remote())
            index = MetadataIndex(redis_srv.url, CacheConfig(service="t-restart"))
            chain = block_chain(root_hash(c.config["fingerprint"], None), list(system.encode()), 16)
            assert r.worker_id in {h.worker_id for h in index.holders(chain)}
            os.kill(before["pid"], signal.SIGKILL)
            after = wait_for(lambda: _health(handle, before["pid"]), "Ray to restart it under the same id", timeout=60)
            assert after["generation"] == before["generation"] + 1
            assert r.worker_id not in {h.worker_id for h in index.holders(chain)}  # old entries purged
            assert index.leases()[r.worker_id].generation == after["generation"]
            # back in rotation once the router's health check sees it
            wait_for(lambda: r.worker_id in c.config_now()["alive"], "the router to see it alive", timeout=30)
        finally:
            c.shutdown()


def _health(handle, old_pid):
    try:
        h = ray.get(handle.health.remote(), timeout=5)
    except ray.exceptions.RayError:
        return None
    return h if h["pid"] != old_pid and h["generation"] else None
