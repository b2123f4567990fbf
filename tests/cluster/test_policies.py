from cache_store import Holding
from cluster.policies import CacheAware, LeastLoaded, PlacementInput, RoundRobin, make_policy
from worker.costs import CostModel

W = ["a", "b", "c"]
CHAIN = [bytes([i]) * 16 for i in range(10)]
FAST_LINK = CostModel(prefill_s_per_token=1e-3, transfer_s_per_block=1e-4, transfer_overhead_s=1e-3)


def x(holdings, inflight=None, costs=None, prompt_tokens=170, service_s=0.5, predicted=None):
    return PlacementInput(
        prompt_tokens, 16, CHAIN, W, inflight or {}, holdings, costs or {}, service_s, predicted=predicted or {}
    )


def test_cache_aware_prefers_the_holder():
    p = CacheAware().place(x([Holding("b", 8, 8, 1)]))
    assert (p.worker_id, p.local_blocks, p.reason) == ("b", 8, "cache")


def test_device_beats_host_at_equal_length():
    p = CacheAware().place(x([Holding("a", 8, 2, 1), Holding("c", 8, 8, 1)]))
    assert p.worker_id == "c"


def test_busy_holder_spreads_load_with_a_peer_fetch():
    costs = {w: FAST_LINK for w in W}
    p = CacheAware().place(x([Holding("b", 8, 8, 1)], inflight={"b": 3}, costs=costs))
    assert p.worker_id != "b"
    assert p.peer == ("b", 8)


def test_no_peer_fetch_when_transfer_is_not_calibrated():
    p = CacheAware().place(x([Holding("b", 8, 8, 1)], inflight={"b": 3}))
    assert p.peer is None


def test_predicted_holdings_steer_but_are_never_fetched_from():
    costs = {w: FAST_LINK for w in W}
    p = CacheAware().place(x([], costs=costs, predicted={"b": 8}))
    assert p.worker_id == "b"  # queue behind the request computing it
    busy = CacheAware().place(x([], inflight={"b": 5}, costs=costs, predicted={"b": 8}))
    assert busy.peer is None  # nothing to fetch yet


def test_a_prediction_does_not_hide_what_is_fetchable():
    costs = {w: FAST_LINK for w in W}
    p = CacheAware().place(x([Holding("b", 6, 6, 1)], inflight={"b": 4}, costs=costs, predicted={"b": 8}))
    assert p.worker_id != "b" and p.peer == ("b", 6)


def test_recomputing_what_another_worker_has_costs_extra():
    costs = {w: FAST_LINK for w in W}
    # the holder is a little busy; without the duplicate penalty a recompute elsewhere would win
    p = CacheAware().place(x([], inflight={"b": 1}, costs=costs, predicted={"b": 10}, service_s=0.2))
    assert p.worker_id == "b"


def test_fallback_when_index_down_is_sticky_per_prefix():
    policy = CacheAware()
    first = policy.place(x(None))
    assert first.reason == "fallback"
    assert all(policy.place(x(None)).worker_id == first.worker_id for _ in range(5))
    loaded = policy.place(x(None, inflight={first.worker_id: 10}))
    assert loaded.worker_id != first.worker_id  # load cap beats stickiness


def test_round_robin_and_least_loaded_ignore_the_cache():
    rr = RoundRobin()
    assert [rr.place(x([Holding("b", 8, 8, 1)])).worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    assert LeastLoaded().place(x([Holding("b", 8, 8, 1)], inflight={"a": 2, "b": 1, "c": 0})).worker_id == "c"


def test_make_policy_names():
    assert make_policy("cache_aware").name == "cache_aware"
    try:
        make_policy("best")
    except ValueError as e:
        assert "choose one of" in str(e)
    else:
        raise AssertionError("unknown policy accepted")


def test_the_shortlist_places_exactly_as_a_scan_of_every_worker(monkeypatch):
    """Placement at 1,000 workers evaluates holders plus the least loaded of the rest; on random
    inputs (mixed costs, loads, holdings, predictions) it must pick what scoring everyone picks."""
    import random

    import cluster.policies as policies

    rng = random.Random(5)
    workers = [f"w{i}" for i in range(40)]
    profiles = [FAST_LINK, CostModel(prefill_s_per_token=2e-3, transfer_s_per_block=5e-4, transfer_overhead_s=2e-3)]
    scan_all = lambda x, expect: list(enumerate(x.workers))  # noqa: E731
    for trial in range(300):
        holders = rng.sample(workers, rng.randint(0, 4))
        held = [Holding(w, rng.randint(1, 10), rng.randint(0, 3), 1) for w in holders]
        x_ = PlacementInput(
            170,
            16,
            CHAIN,
            workers,
            {w: rng.randint(0, 3) for w in workers if rng.random() < 0.5},
            held,
            {w: rng.choice(profiles) for w in workers},
            rng.choice([0.05, 0.5]),
            {w: rng.randint(0, 5) for w in workers if rng.random() < 0.3},
            trial,
            {w: rng.randint(1, 10) for w in rng.sample(workers, rng.randint(0, 2))},
        )
        fast = CacheAware().place(x_)
        monkeypatch.setattr(policies, "_shortlist", scan_all)
        slow = CacheAware().place(x_)
        monkeypatch.undo()
        assert fast == slow, trial
