"""Store + index + lease keeper against a real server that goes away and comes back."""

import time

from cache_store import CacheConfig, LeaseKeeper, MetadataIndex
from tests.polling import wait_for

from .helpers import chain, make_store, serve

FAST = dict(lease_ttl_s=0.6, heartbeat_s=0.1, redis_timeout_s=0.3, redis_retry_s=0.2)


def setup(server, worker="w1", device_blocks=16, host_blocks=0):
    store = make_store(device_blocks, host_blocks, **FAST)
    index = MetadataIndex(server.url, CacheConfig(**FAST))
    keeper = LeaseKeeper(index, store, worker, info={"device": "cpu"}, gauges=lambda: {"queue": 0})
    keeper.beat()
    return store, index, keeper


def held(index, tokens):
    h, _ = chain(tokens)
    return {x.worker_id: x.blocks for x in index.holders(h)}


def beat_until_reconnected(keeper, store=None) -> None:
    """Heartbeats until the keeper is back on Redis (and, given its store, has re-published it)."""

    def back():
        keeper.beat()
        return keeper.connected and not (store is not None and store.needs_resync)

    wait_for(back, "the keeper to reconnect" + (" and resync" if store is not None else ""), timeout=5.0, every=0.05)


def test_store_publishes_every_change(redis_server):
    store, index, keeper = setup(redis_server, device_blocks=2, host_blocks=0)
    a, b = list(range(8)), [50 + i for i in range(8)]
    serve(store, a)
    assert held(index, a) == {"w1": 2}
    serve(store, b)  # evicts a (no host tier)
    assert held(index, a) == {}
    assert held(index, b) == {"w1": 2}
    keeper.stop()
    assert held(index, b) == {}  # graceful exit removes our entries


def test_outage_then_empty_restart_republishes(redis_server):
    store, index, keeper = setup(redis_server)
    a, b = list(range(8)), [50 + i for i in range(8)]
    serve(store, a)
    store.counters.add("requests", 1)
    keeper.beat()
    redis_server.stop()  # comes back empty
    serve(store, b)  # still served, locally
    assert store.lookup(*chain(b)) == 2
    store.counters.add("requests", 1)
    keeper.beat()
    assert not keeper.connected and store.needs_resync
    redis_server.start()
    beat_until_reconnected(keeper)
    assert held(index, a) == {"w1": 2} and held(index, b) == {"w1": 2}
    # The counter of the outage arrived once; the one flushed before died with the old data.
    assert index.counters(["w1"])["w1"]["requests"] == 1


def test_restart_with_stale_data_is_reconciled(redis_server):
    store, index, keeper = setup(redis_server, device_blocks=2)
    a, b = list(range(8)), [50 + i for i in range(8)]
    serve(store, a)
    redis_server.stop(save=True)  # comes back with entries for `a`
    serve(store, b)  # evicts `a` while Redis is away
    keeper.beat()
    redis_server.start()
    time.sleep(FAST["lease_ttl_s"])  # the saved lease expires meanwhile
    beat_until_reconnected(keeper, store)
    assert held(index, a) == {}
    assert held(index, b) == {"w1": 2}


def test_counters_survive_an_outage_exactly_once(redis_server):
    store, index, keeper = setup(redis_server)
    store.counters.add("requests", 3)
    keeper.beat()
    redis_server.stop(save=True)
    store.counters.add("requests", 2)
    keeper.beat()
    keeper.beat()
    redis_server.start()
    beat_until_reconnected(keeper)
    keeper.beat()
    assert index.counters(["w1"])["w1"]["requests"] == 5


def test_second_instance_fences_the_first(redis_server):
    store1, index, k1 = setup(redis_server, "same")
    serve(store1, list(range(8)))
    store2, _, k2 = setup(redis_server, "same")
    assert k2.generation == k1.generation + 1
    k1.beat()
    assert k1.fenced
    serve(store2, [9] * 8)
    assert held(index, [9] * 8) == {"same": 2}
    assert held(index, list(range(8))) == {}


def test_keeper_thread_keeps_the_lease(redis_server):
    store, index, keeper = setup(redis_server)
    keeper.start()
    try:
        serve(store, list(range(8)))
        time.sleep(FAST["lease_ttl_s"] * 2)
        assert held(index, list(range(8))) == {"w1": 2}
    finally:
        keeper.stop()
