"""Router replicas: a service with several routers sharing one index, requests dealt by prompt prefix."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import ray

from cache_store import CacheConfig, MetadataIndex
from cluster import Cluster
from cluster.dashboard.collect import collect
from cluster.service.lookup import find_router
from cluster.service.spec import ServiceSpec, replica_for, router_name
from tests.polling import wait_for
from worker.actor import NAMESPACE

from .reference import greedy

BS = CacheConfig.block_size
SERVICE = "t-replicas"


# ---- dealing (no Ray) ----------------------------------------------------------------------


def test_one_prefix_meets_one_replica_and_prefixes_spread():
    rng = random.Random(0)
    systems = ["".join(rng.choice("abcdefgh ") for _ in range(3 * BS)) for _ in range(400)]
    for s in systems[:20]:  # same first block (text or ids), any suffix: same replica
        assert len({replica_for(s + f" question {i}", None, BS, 4) for i in range(10)}) == 1
        ids = [ord(ch) for ch in s]
        assert len({replica_for(ids + [i] * 5, None, BS, 4) for i in range(10)}) == 1
    spread = Counter(replica_for(s, None, BS, 4) for s in systems)
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 60  # 100 each when even
    # another tenant's prompt is another prefix: its own deal
    assert len({replica_for(systems[0], f"tenant-{t}", BS, 4) for t in range(40)}) == 4
    assert replica_for(systems[0], None, BS, 1) == 0


def test_bad_prompts_go_to_replica_zero_which_says_what_is_wrong():
    for bad in (None, 12, {"a": 1}, 3.5):
        assert replica_for(bad, None, BS, 4) == 0


def test_replica_count_is_checked():
    with pytest.raises(ValueError, match="routers must be an integer in 1..64"):
        ServiceSpec(routers=0)
    with pytest.raises(ValueError, match="routers must be"):
        ServiceSpec(routers=65)


# ---- a service with two replicas -------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(ray_local):
    c = Cluster.start(workers=2, model="demo", service=SERVICE, routers=2, device_cache_gb=0.05, host_cache_gb=0.05)
    yield c
    c.shutdown()


def prompts_for_each_replica(n_per_replica: int) -> dict[int, list[str]]:
    """Prompts (distinct first blocks) that the client deals to replica 0 and to replica 1."""
    out: dict[int, list[str]] = {0: [], 1: []}
    i = 0
    while min(len(v) for v in out.values()) < n_per_replica:
        p = f"Replica prompt {i:04d}: tell me about the number {i} in a few words. "
        r = replica_for(p, None, BS, 2)
        if len(out[r]) < n_per_replica:
            out[r].append(p)
        i += 1
    return out


def test_both_replicas_place_and_the_stats_add_them_up(svc):
    by_replica = prompts_for_each_replica(3)
    prompts = by_replica[0] + by_replica[1]
    before = svc.stats()
    results = svc.generate(prompts, max_new_tokens=6)
    assert all(r.ok for r in results)
    for p, r in zip(prompts, results):
        assert r.token_ids == greedy(p, 6)
    s = svc.stats()
    routed = {r["replica"]: r["router"].get("routed", 0) for r in s["routers"]}
    was = {r["replica"]: r["router"].get("routed", 0) for r in before["routers"]}
    assert routed[0] - was[0] == 3 and routed[1] - was[1] == 3  # each placed what it was dealt
    assert s["router"]["routed"] == routed[0] + routed[1]
    assert not any("error" in r for r in s["routers"])


def test_the_dashboard_counts_the_replicas_and_sums_their_counters(svc):
    index = MetadataIndex(svc.redis_url, CacheConfig(service=SERVICE))
    svc.generate(prompts_for_each_replica(2)[1], max_new_tokens=2)
    routed = svc.stats()["router"]["routed"]  # both replicas' own counts, added up

    def flushed():
        snap = collect(index)
        return snap if snap["router"].get("routed") == routed else None

    assert wait_for(flushed, "both replicas' counters in the index")["model"]["routers"] == 2


def test_a_prefix_keeps_hitting_through_its_replica(svc):
    system = "A shared system prompt for the replica cache test. Answer briefly. " * 4
    first = svc.generate([system + "Q0?"], max_new_tokens=3)[0]
    again = svc.generate([system + "Q1?"], max_new_tokens=3)[0]
    assert first.cached_tokens < BS and again.cached_tokens >= (len(system) // BS) * BS  # held or fetched
    streamed = list(svc.stream(system + "Q2?", max_new_tokens=3))
    assert streamed[-1].result.ok and streamed[-1].result.cached_tokens >= (len(system) // BS) * BS


def test_set_policy_reaches_every_replica(svc):
    try:
        svc.set_policy("round_robin")
        assert [ray.get(find_router(SERVICE, i).config.remote())["policy"] for i in range(2)] == ["round_robin"] * 2
    finally:
        svc.set_policy("cache_aware")


def test_a_restarted_replica_starts_again_and_finds_the_workers_alive_now(svc):
    added = svc.add_workers(1)
    svc.set_policy("least_loaded")  # after the start: the constructor's spec does not have it
    # a worker of the constructor's list dead for good (past its restarts): the replica starts without it
    ray.kill(ray.get_actor(f"{SERVICE}:worker-0", namespace=NAMESPACE), no_restart=True)
    replica = find_router(SERVICE, 1)
    ray.kill(replica, no_restart=False)  # Ray restarts it with its constructor's arguments
    prompt = prompts_for_each_replica(1)[1][0] + "after the restart"

    def served():
        try:
            [r] = svc.generate([prompt], max_new_tokens=4)
        except ray.exceptions.RayActorError:
            return None  # still restarting
        return r

    r = wait_for(served, "the restarted replica to serve", timeout=60)
    assert r.ok and r.token_ids == greedy(prompt, 4)
    cfg = ray.get(find_router(SERVICE, 1).config.remote())
    assert set(added) <= set(cfg["workers"]) and sorted(cfg["workers"]) == ["worker-1", "worker-2"]
    assert cfg["policy"] == "least_loaded"
    svc.set_policy("cache_aware")


def test_stop_removes_every_replica(svc):
    svc.stop_service()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    assert router_name(SERVICE, 0) not in names and router_name(SERVICE, 1) not in names
    assert not any(n.startswith(f"{SERVICE}:") for n in names)
