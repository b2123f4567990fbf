import time

import pytest
import redis

from cache_store import CacheConfig, Fenced, IndexAuthError, IndexUnavailable, MetadataIndex, redact

from .helpers import chain

FAST = CacheConfig(lease_ttl_s=0.5, heartbeat_s=0.1, redis_timeout_s=0.3, redis_retry_s=0.5)


def adds(hashes, tier="device"):
    return [("add", h, tier) for h in hashes]


def test_holders_leading_run_and_tiers_in_one_round_trip(redis_server):
    idx = MetadataIndex(redis_server.url)
    ga, gb = idx.register("a"), idx.register("b")
    h, _ = chain(list(range(24)))  # 6 blocks
    idx.publish("a", ga, adds(h[:2]) + adds(h[2:4], "host"))
    idx.publish("b", gb, adds(h[:2]))
    idx.publish("b", gb, adds(h[3:5]))  # not a leading run beyond block 2: a gap at block 3
    got = {x.worker_id: (x.blocks, x.device_blocks) for x in idx.holders(h)}
    assert got == {"a": (4, 2), "b": (2, 2)}
    assert idx.holders(h)[0].worker_id == "a"  # most blocks first

    r = redis.Redis.from_url(redis_server.url)

    def client_commands():
        # Commands run inside a script count too; subtract the script's own HGETALL/HGET.
        stats = r.info("commandstats")
        inner = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hgetall", "hget"))
        return r.info("stats")["total_commands_processed"] - inner

    baseline = -client_commands() + client_commands()  # what measuring itself costs
    before = client_commands()
    idx.holders(h)
    assert client_commands() - before - baseline == 1  # one EVALSHA, nothing else


def test_publish_moves_and_removes(redis_server):
    idx = MetadataIndex(redis_server.url)
    g = idx.register("a")
    h, _ = chain(list(range(12)))
    idx.publish("a", g, adds(h))
    idx.publish("a", g, [("move", h[2], "host"), ("remove", h[1], "device")])
    assert [(x.blocks, x.device_blocks) for x in idx.holders(h)] == [(1, 1)]
    assert idx.block_entries(h[2]) == {"a": f"{g}:h"}
    assert idx.block_entries(h[1]) == {}


def test_dead_worker_stops_counting_within_ttl(redis_server):
    idx = MetadataIndex(redis_server.url, FAST)
    g = idx.register("a")
    h, _ = chain(list(range(8)))
    idx.publish("a", g, adds(h))
    assert idx.holders(h)
    time.sleep(FAST.lease_ttl_s + 0.2)  # no heartbeat: the lease lapses
    assert idx.holders(h) == []
    assert "a" in idx.reap_dead()
    assert idx.block_entries(h[0]) == {}


def test_restarted_worker_does_not_resurrect_old_entries(redis_server):
    idx = MetadataIndex(redis_server.url)
    old = idx.register("w")
    h, _ = chain(list(range(8)))
    idx.publish("w", old, adds(h))
    new = idx.register("w")  # same id restarts with an empty cache
    assert new == old + 1
    assert idx.holders(h) == []
    assert idx.block_entries(h[0]) == {}
    # A zombie of the old generation is ignored and fenced.
    idx.publish("w", old, adds(h))
    assert idx.holders(h) == []
    with pytest.raises(Fenced):
        idx.heartbeat("w", old, {})
    idx.publish("w", new, adds(h[:1]))
    assert [(x.worker_id, x.blocks, x.generation) for x in idx.holders(h)] == [("w", 1, new)]


def test_heartbeat_flushes_counters_and_reports_lapsed_lease(redis_server):
    idx = MetadataIndex(redis_server.url, FAST)
    g = idx.register("a", {"device": "cpu"})
    assert idx.heartbeat("a", g, {"queue": 3}, {"requests": 2, "hit_tokens": 40}).lease_was_missing is False
    idx.heartbeat("a", g, {"queue": 0}, {"requests": 1})
    assert idx.counters(["a"]) == {"a": {"requests": 3, "hit_tokens": 40}}
    lease = idx.leases()["a"]
    assert lease.generation == g and lease.fields["queue"] == "0"
    time.sleep(FAST.lease_ttl_s + 0.2)
    assert idx.heartbeat("a", g, {}).lease_was_missing is True
    assert "a" in idx.leases()


def test_replace_blocks_makes_index_exact(redis_server):
    idx = MetadataIndex(redis_server.url)
    g = idx.register("a")
    h, _ = chain(list(range(16)))
    idx.publish("a", g, adds(h))
    idx.replace_blocks("a", g, [(h[0], "device"), (h[1], "host")])
    assert [(x.blocks, x.device_blocks) for x in idx.holders(h)] == [(2, 1)]
    assert idx.block_entries(h[3]) == {}


def test_only_namespaced_keys_and_no_keyspace_scans(redis_server):
    idx = MetadataIndex(redis_server.url, CacheConfig(service="svc1"))
    g = idx.register("a")
    h, _ = chain(list(range(16)))
    idx.publish("a", g, adds(h))
    idx.holders(h)
    idx.heartbeat("a", g, {}, {"requests": 1})
    idx.reap_dead()
    idx.set_service_info({"fingerprint": "abc", "block_size": 4})
    assert idx.service_info() == {"fingerprint": "abc", "block_size": 4}
    r = redis.Redis.from_url(redis_server.url)
    stats = r.info("commandstats")
    assert not any(c in stats for c in ("cmdstat_keys", "cmdstat_scan"))
    keys = [k.decode() for k in r.keys("*")]  # the test may look; the product never does
    assert keys and all(k.startswith("pfx:{svc1}:") for k in keys)


def test_unreachable_redis_fails_fast_after_first_timeout(redis_server):
    idx = MetadataIndex(redis_server.url, FAST)
    h, _ = chain(list(range(8)))
    idx.register("a")
    redis_server.kill()
    t0 = time.monotonic()
    with pytest.raises(IndexUnavailable, match="unreachable"):
        idx.holders(h)
    assert time.monotonic() - t0 < 5 * FAST.redis_timeout_s
    with pytest.raises(IndexUnavailable, match="next try"):  # only the open breaker says it: no network call
        idx.holders(h)
    assert not idx.available


def test_index_recovers_when_redis_returns(redis_server):
    idx = MetadataIndex(redis_server.url, FAST)
    idx.register("a")
    redis_server.stop()
    with pytest.raises(IndexUnavailable):
        idx.workers()
    redis_server.start()
    time.sleep(FAST.redis_retry_s)
    assert idx.workers() == []  # came back empty
    assert idx.available


def test_wrong_or_missing_password_is_a_clear_error(redis_server):
    bad = redis_server.url.replace(redis_server.password, "wrong-password")
    with pytest.raises(IndexAuthError, match="password"):
        MetadataIndex(bad).ping()
    none = f"redis://{redis_server.host}:{redis_server.port}/0"
    with pytest.raises(IndexAuthError, match="password"):
        MetadataIndex(none).ping()


def test_bad_url_is_a_clear_error():
    with pytest.raises(ValueError, match="redis://"):
        MetadataIndex("http://localhost:6379")


def test_redact_hides_password():
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://u:s3cret@h:1") == "redis://u:***@h:1"
    assert redact("redis://h:1") == "redis://h:1"


def test_stored_and_distinct_blocks_stay_exact(valkey):
    idx = MetadataIndex(valkey.url)
    ga, gb = idx.register("a"), idx.register("b")
    h, _ = chain(list(range(16)))  # 4 blocks
    idx.publish("a", ga, adds(h))
    idx.publish("b", gb, adds(h[:2]))
    idx.publish("a", ga, adds(h[:1], "host"))  # a move: no new copy
    assert idx.block_counts() == (6, 4)
    assert idx.block_counts().duplicates == 2
    idx.publish("a", ga, [("remove", h[3], "device"), ("remove", h[3], "device")])  # twice: counted once
    assert idx.block_counts() == (5, 3)
    idx.purge_worker("a")
    assert idx.block_counts() == (2, 2)
    idx.deregister("b", gb)
    assert idx.block_counts() == (0, 0)
