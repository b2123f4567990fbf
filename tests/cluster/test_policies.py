import dataclasses

from cache_store import Holding
from cluster.routing.policies import (
    CacheAware,
    LeastLoaded,
    Placement,
    PlacementInput,
    RoundRobin,
    make_policy,
    usable_blocks,
)
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


def test_a_disk_hit_counts_only_where_reading_beats_recomputing():
    fast = CostModel(prefill_s_per_token=1e-3, disk_read_s_per_block=1e-4, disk_read_overhead_s=1e-4)
    slow = CostModel(prefill_s_per_token=1e-3, disk_read_s_per_block=1.0)
    held = [Holding("a", 8, 2, 1, disk_blocks=6), Holding("c", 4, 4, 1)]
    p = CacheAware().place(x(held, costs={w: fast for w in W}))
    assert (p.worker_id, p.local_blocks) == ("a", 8)  # reading 6 blocks beats prefilling 96 tokens
    p = CacheAware().place(x(held, costs={w: slow for w in W}))
    assert (p.worker_id, p.local_blocks) == ("c", 4)  # a's disk tail would be recomputed: 2 blocks left
    assert CacheAware().place(x(held[:1], costs={w: slow for w in W})).local_blocks == 2


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


def test_a_churning_holder_prices_the_blocks_it_would_write():
    # b holds the 8-block system prompt; the request adds 2 blocks. Idle, b wins (test above); once
    # b's cache churns (each block written there is likely to evict a live one), the new session goes
    # to a worker whose cache keeps its blocks, fetching the prompt, whose copy is priced too.
    costs = {w: FAST_LINK for w in W}
    held = [Holding("b", 8, 8, 1)]
    calm = CacheAware().place(dataclasses.replace(x(held, costs=costs), churn_s={"b": 1e-4}))
    assert calm.worker_id == "b"  # 2 blocks x 0.1 ms < fetching 8 (1.8 ms)
    p = CacheAware().place(dataclasses.replace(x(held, costs=costs), churn_s={"b": 0.01}))
    assert p.worker_id != "b" and p.peer == ("b", 8)
    # every other worker churns harder than b per block, and writes 10 blocks to b's 2: b again
    p = CacheAware().place(dataclasses.replace(x(held, costs=costs), churn_s={"a": 0.01, "b": 0.01, "c": 0.01}))
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


def scan_every_worker(x):
    """What `CacheAware.place` must pick, by its definition: score every worker (its queue, and the
    churn of the blocks it would write, included), least (cost rounded to 1e-9 s, in-flight,
    prefixes, position - turn mod n) wins. O(workers^2); tests only."""
    policy = CacheAware()
    live = set(x.workers)
    actual = {h.worker_id: h for h in x.holdings if h.worker_id in live and h.blocks > 0}
    expect = {w: max(usable_blocks(x, actual[w]) if w in actual else 0, x.predicted.get(w, 0)) for w in x.workers}
    best = max((h.blocks for h in x.holdings if h.worker_id in live), default=0)
    n = len(x.workers)
    if not any(expect.values()):
        i, w = min(
            enumerate(x.workers),
            key=lambda iw: (x.inflight.get(iw[1], 0), x.prefixes.get(iw[1], 0), (iw[0] - x.turn) % n),
        )
        return Placement(w, 0, None, "load", 0)
    scored = []
    for i, w in enumerate(x.workers):
        elsewhere = max((b for v, b in expect.items() if v != w), default=0)
        cost, placement = policy._estimate(x, w, actual, expect, elsewhere, best)
        cost += x.extra_s(w, len(x.chain) - placement.local_blocks)
        scored.append(((round(cost, 9), x.inflight.get(w, 0), x.prefixes.get(w, 0), (i - x.turn) % n), placement))
    return min(scored)[1]


def random_input(rng, workers, profiles, trial):
    """Random holdings, predictions, loads and counts, drawn from few values so ties are common."""
    holders = rng.sample(workers, rng.randint(0, min(4, len(workers))))
    held = []
    for w in holders:  # some with a disk-only tail after their device and host blocks
        n, dev = rng.randint(0, 10), rng.randint(0, 3)
        held.append(Holding(w, n, min(dev, n), 1, rng.choice([0, 0, max(0, n - dev - 1)])))
    if rng.random() < 0.2:
        load = None  # in-flight x service_s
    else:
        # equal, nearly equal (ties once rounded to 1e-9 s) and distinct queues; absent ones are 0, so
        # also with no 0 given, and with some barely above 0
        values = [0.1, 0.1 + 3e-10, 0.1 + 2e-9, 0.25, rng.random()] + rng.choice([[0.0], [], [3e-10, 2e-6]])
        load = {w: rng.choice(values) for w in workers if rng.random() < rng.choice([0.3, 0.7, 1.0])}
    costs = {w: rng.choice(profiles) for w in workers if rng.random() < 0.9}  # some not measured yet
    return PlacementInput(
        rng.choice([40, 170, 400]),
        16,
        CHAIN,
        workers,
        {w: rng.randint(0, 3) for w in workers if rng.random() < 0.5},
        held,
        costs,
        rng.choice([0.05, 0.5]),
        {w: rng.randint(0, 2) for w in workers if rng.random() < 0.3},
        trial * 7,
        {w: rng.randint(0, 10) for w in rng.sample(workers, rng.randint(0, min(2, len(workers))))},
        load,
        None,
        # churn prices: none, or some workers' (equal ones tie; tiny ones tie once rounded)
        rng.choice([None, {}, {w: rng.choice([1e-3, 1e-3, 2e-11, 0.02]) for w in workers if rng.random() < 0.4}]),
    )


def test_placement_is_exactly_a_scan_of_every_worker():
    """Placement scores holders plus one idle worker per cost profile; on random inputs (several
    profiles, some equal only once rounded, ties in load and counts) it must pick what scoring
    every worker picks, with or without the caller's split by profile."""
    import random

    rng = random.Random(5)
    measured = [
        CostModel(prefill_s_per_token=p, transfer_s_per_block=t, transfer_overhead_s=o, max_running=m)
        for p, t, o, m in [(1.01e-3, 1.02e-4, 1.0e-3, 1), (1.04e-3, 1.03e-4, 1.04e-3, 1), (2e-3, 5e-4, 2e-3, 4)]
    ]
    rounded = [c.rounded() for c in measured]
    assert rounded[0] == rounded[1] and rounded[0] is not rounded[1]  # equal profiles, two objects
    slow_host = CostModel(promote_s_per_block=0.05)  # a holder with blocks on host can cost more than none
    fast_disk = CostModel(prefill_s_per_token=1e-3, disk_read_s_per_block=1e-4)  # its disk tails count
    profiles = [FAST_LINK, CostModel(), slow_host, fast_disk, *measured, *rounded]
    for trial in range(1500):
        workers = [f"w{i}" for i in range(rng.choice([1, 3, 40]))]
        x_ = random_input(rng, workers, profiles, trial)
        want = scan_every_worker(x_)
        assert CacheAware().place(x_) == want, trial
        parts = {}
        for i, w in enumerate(workers):
            parts.setdefault(x_.costs.get(w, CostModel()), []).append(i)  # by value, as the router interns
        split = dataclasses.replace(x_, profiles=list(parts.values()))
        assert CacheAware().place(split) == want, trial
