"""Router without Ray: a real index (Valkey), real tokenizer, holdings published as a worker would."""

import pytest

from cache_store import CacheConfig, MetadataIndex
from cluster.routing.policies import CacheAware, RoundRobin
from cluster.routing.router import NoWorker, Router
from worker.costs import CostModel
from worker.demo_model import demo_tokenizer
from worker.request import ErrorKind, Request

FP = "f" * 32


def make_router(index, policy=None, workers=("w0", "w1")):
    r = Router(
        tokenizer=demo_tokenizer(),
        fingerprint=FP,
        block_size=16,
        max_context=8192,
        vocab_size=259,
        index=index,
        policy=policy or CacheAware(),
        workers=list(workers),
    )
    for w in workers:
        r.set_costs(w, CostModel(prefill_s_per_token=1e-3, transfer_s_per_block=1e-4, transfer_overhead_s=1e-3))
    return r


def publish(index, worker, chain):
    gen = index.register(worker)
    index.publish(worker, gen, [("add", h, "device") for h in chain])


@pytest.fixture
def index(valkey):
    idx = MetadataIndex(valkey.url, CacheConfig(redis_timeout_s=0.3, redis_retry_s=0.3))
    yield idx
    idx.close()


def test_prepare_tokenizes_and_rejects_bad_requests(index):
    router = make_router(index)
    ids, chain = router.prepare(Request("x" * 40))
    assert ids == [ord("x")] * 40 and len(chain) == 2
    for req, kind, words in [
        (Request([1, 999]), ErrorKind.BAD_REQUEST, "outside the vocabulary"),
        (Request("x" * 8000, max_new_tokens=500), ErrorKind.CONTEXT_EXCEEDED, "exceeds the model context"),
        (Request("  "), ErrorKind.BAD_REQUEST, "empty or whitespace"),
    ]:
        problem = router.prepare(req)
        assert problem.kind is kind and words in problem.message, problem


def test_places_on_the_holder_and_salt_changes_the_chain(index):
    router = make_router(index)
    ids, chain = router.prepare(Request("Shared prefix! " * 5))
    publish(index, "w1", chain)
    plan = router.place(ids, chain)
    assert plan.placement.worker_id == "w1" and plan.placement.local_blocks == len(chain)
    _, salted = router.prepare(Request("Shared prefix! " * 5, cache_salt="t"))
    assert not set(salted) & set(chain)


def test_busy_holder_gets_a_peer_hint_elsewhere(index):
    router = make_router(index)
    ids, chain = router.prepare(Request("Popular system prompt. " * 10))
    publish(index, "w0", chain)
    assert router.place(ids, chain).placement.worker_id == "w0"  # in flight there now
    plan = router.place(ids, chain)  # queueing behind it costs more than pulling 35 blocks
    assert plan.placement.worker_id == "w1" and plan.placement.peer == ("w0", len(chain))


def test_burst_is_steered_by_recent_placements(index):
    router = make_router(index)
    ids, chain = router.prepare(Request("Burst prefix. " * 80))  # recompute (1.1 s) > one queued request (0.5 s)
    first = router.place(ids, chain).placement.worker_id
    second = router.place(ids, chain).placement  # nothing published yet: the prediction steers
    assert second.worker_id == first and second.peer is None


def test_index_down_falls_back_and_counts_it(index, valkey):
    router = make_router(index)
    ids, chain = router.prepare(Request("Sticky prefix. " * 6))
    valkey.kill()
    plans = [router.place(ids, chain).placement for _ in range(3)]
    assert {p.reason for p in plans} == {"fallback"}
    assert len({p.worker_id for p in plans}) == 1
    assert router.counters.get("placement_index_down") == 3


def test_dead_workers_are_skipped_and_none_left_is_an_error(index):
    router = make_router(index, RoundRobin())
    ids, chain = router.prepare(Request("hello there"))
    router.mark_dead("w0")
    assert {router.place(ids, chain).placement.worker_id for _ in range(4)} == {"w1"}
    with pytest.raises(NoWorker):
        router.place(ids, chain, exclude=["w1"])


def test_miss_reasons_are_token_weighted(index):
    router = make_router(index)
    text = "Held prefix here. " * 4  # 72 bytes: 4 full blocks
    ids, chain = router.prepare(Request(text))
    publish(index, "w0", chain[:2])
    plan = router.place(ids, chain, exclude=["w0"])  # forced elsewhere: w0's 2 blocks are "held elsewhere"
    router.account(plan, cached_tokens=0)
    c = router.counters.snapshot()
    assert c["miss_tokens_held_elsewhere"] == 32 and c["miss_tokens_never_seen"] == 32
    assert c["cold_requests"] == 1
    index.publish("w0", index.leases()["w0"].generation, [("remove", h, "device") for h in chain[:2]])
    plan = router.place(ids, chain)
    router.account(plan, cached_tokens=0)
    assert router.counters.get("miss_tokens_evicted") == 32  # held once, by nobody now


def test_predictions_end_with_the_request(index):
    router = make_router(index)
    ids, chain = router.prepare(Request("Prediction lifetime. " * 60))
    first = router.place(ids, chain)
    second = router.place(ids, chain)
    assert second.placement.worker_id == first.placement.worker_id  # steered by the prediction
    router.finished(first, 0.1)
    router.finished(second, 0.1)
    # Both done and nothing was published (say, evicted at once): nobody is assumed to hold it, so
    # the next request is placed as a cold one, where the fewest prefixes live.
    third = router.place(ids, chain)
    assert third.placement.reason == "load" and third.placement.local_blocks == 0


def test_a_batching_holder_takes_a_burst_until_its_queued_prefill_costs_more_than_a_fetch(index):
    router = make_router(index)
    for w in ("w0", "w1"):
        router.set_costs(
            w,
            CostModel(prefill_s_per_token=1e-3, transfer_s_per_block=1e-4, transfer_overhead_s=0.02, max_running=8),
        )
    ids, chain = router.prepare(Request("Popular system prompt. " * 10))  # 14 blocks + 6 tokens
    publish(index, "w0", chain)
    warm = [router.place(ids, chain).placement.worker_id for _ in range(3)]
    assert warm == ["w0"] * 3  # batched together: 6 ms of prefill each queued, less than a 22 ms fetch
    spread = []
    for q in "abc":  # each brings its own 400 uncached tokens (0.4 s of prefill)
        long_ids, long_chain = router.prepare(Request(ids + [ord(q)] * 400))
        spread.append(router.place(long_ids, long_chain).placement)
    assert spread[0].worker_id == "w0"
    assert any(p.worker_id == "w1" and p.peer == ("w0", len(chain)) for p in spread[1:])


def test_queued_prefill_is_forgotten_as_it_runs(index):
    router = make_router(index)
    now = [1000.0]
    router.clock = lambda: now[0]
    ids, chain = router.prepare(Request("x" * 500))
    plan = router.place(ids, chain)
    w = plan.placement.worker_id
    queued = router._load_s(0.0).get(w, 0.0)
    assert queued == pytest.approx(0.5, rel=0.01)  # 500 uncached tokens at 1 ms each
    now[0] += 0.3
    assert router._load_s(0.0).get(w, 0.0) == pytest.approx(0.2, rel=0.05)
    router.finished(plan, 0.4)
    assert router._load_s(0.0).get(w, 0.0) == 0.0


def test_load_and_predictions_are_what_walking_every_request_gives():
    """`_load_s` reads per-worker prefill ends and over-batch counts; on random placements,
    finishes and clock steps it must equal the definition: the sum over requests in flight of
    max(0, prefill end - now), plus (in flight - batch + 1) x service_s / batch once at the batch.
    `_predicted` must give each worker the leading blocks that requests placed there compute."""
    import random

    rng = random.Random(3)
    workers = [f"w{i}" for i in range(6)]
    router = make_router(None, workers=workers)
    for w in workers[:3]:
        router.set_costs(w, CostModel(prefill_s_per_token=1e-3, max_running=rng.randint(1, 3)))
    now = [50.0]
    router.clock = lambda: now[0]
    plans = []
    for step in range(400):
        if plans and rng.random() < 0.4:
            router.finished(plans.pop(rng.randrange(len(plans))), rng.choice([None, 0.2]))
        else:
            ids, chain = router.prepare(Request("y" * rng.randint(20, 600)))
            plans.append(router.place(ids, chain))
        now[0] += rng.choice([0.0, 0.01, 0.1, 0.5])
        service_s = rng.choice([0.05, 0.5])
        want = {}
        for w, end in router._work.values():
            want[w] = want.get(w, 0.0) + max(0.0, end - now[0])
        for w, n in router.inflight.items():
            batch = router.costs.get(w, CostModel()).max_running
            if n >= batch:
                want[w] = want.get(w, 0.0) + (n - batch + 1) * service_s / batch
        got = router._load_s(service_s)
        for w in workers:
            assert got.get(w, 0.0) == pytest.approx(want.get(w, 0.0), abs=1e-9), (step, w)
        chain = router.prepare(Request("y" * rng.randint(20, 600)))[1]
        runs = {
            w: next((i for i, h in enumerate(chain) if w not in router._pending.get(h, ())), len(chain))
            for w in workers
        }
        assert router._predicted(chain, set()) == {w: n for w, n in runs.items() if n}, step


def test_measured_costs_are_rounded_so_equal_hardware_is_one_profile():
    router = make_router(None, workers=("a", "b", "c"))
    router.set_costs("a", CostModel(prefill_s_per_token=4.0123e-4, transfer_s_per_block=1.234e-4))
    router.set_costs("b", CostModel(prefill_s_per_token=3.9876e-4, transfer_s_per_block=1.229e-4))
    router.set_costs("c", CostModel(prefill_s_per_token=5.1e-4, transfer_s_per_block=1.2e-4))
    assert router.costs["a"] is router.costs["b"]  # one object: placement groups by identity
    assert router.costs["a"].prefill_s_per_token == 4.0e-4 and router.costs["a"].transfer_s_per_block == 1.2e-4
    assert router.costs["c"] != router.costs["a"]
    with router._lock:
        assert sorted(router._candidates(set())[1]) == [[0, 1], [2]]  # positions of a, b and of c


def test_a_placement_whose_caller_went_away_is_finished(index, valkey):
    """The router actor places in a thread; a caller cancelled meanwhile (a client that disconnected)
    must not leave the request counted in flight on its worker, steering later placements."""
    import asyncio
    import threading

    from cluster.service.router_actor import RouterService
    from cluster.service.spec import ServiceSpec

    svc = RouterService(ServiceSpec().to_dict(), ["w0", "w1"], valkey.url)
    svc.router = make_router(index)
    release, place = threading.Event(), svc.router.place
    svc.router.place = lambda *a: release.wait(5) and place(*a)  # a slow index round trip
    ids, chain = svc.router.prepare(Request("The caller goes away while this is placed. " * 3))

    async def cancel_mid_place():
        task = asyncio.ensure_future(svc._place(ids, chain, []))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        for _ in range(250):
            await asyncio.sleep(0.02)
            if not svc.router.inflight:
                return

    asyncio.run(cancel_mid_place())
    assert not svc.router.inflight and not svc.router._pending


def test_new_sessions_on_one_system_prompt_spread_by_cache_churn(index):
    """Sessions under one shared system prompt, one at a time (no queue anywhere): the prompt's
    holder is always the cheapest place, so without pricing churn every session piles onto it and,
    at scale, they evict each other's live turns while other caches sit empty. The router counts the
    blocks it sends each worker to write and prices them once a worker is written faster than the
    mean: sessions spread, each other worker fetching the prompt once."""
    router = make_router(index, workers=("w0", "w1", "w2", "w3"))
    router.clock = lambda: 100.0  # rates are compared, so a still clock is enough
    system = "You are a helpful assistant. " * 6  # 10 blocks of 16 bytes
    ids, chain = router.prepare(Request(system))
    publish(index, "w0", chain)
    placed, written = [], {}
    for i in range(8):
        ids, chain = router.prepare(Request(system + f"session {i} asks its own question " * 2))
        plan = router.place(ids, chain)
        w = plan.placement.worker_id
        placed.append(w)
        written[w] = written.get(w, 0) + len(chain) - plan.placement.local_blocks  # copies included
        publish(index, w, chain)  # as the worker would once its prefill ran
        router.finished(plan, 0.01)
    assert placed[0] == "w0"  # the first one: nothing churns yet
    assert set(placed) == {"w0", "w1", "w2", "w3"}  # then every cache takes its share
    # balanced by the blocks each cache was given (4 per session on the holder, 10 + 4 elsewhere)
    assert max(written.values()) <= 1.25 * min(written.values()), written
    churn = router.churn
    assert churn and all(0 < v < 16 * 1e-3 for v in churn.values())  # under one block's recompute
    router.mark_dead("w1")  # a dead worker's writes leave the mean with it
    assert "w1" not in router.churn
