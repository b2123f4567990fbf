"""The trace simulator: hit rates on hand-made traces whose answers are computed by hand."""

import json

import pytest

from cluster.cli.main import main
from cluster.simulate import BOUND, TimeModel, TraceError, TraceRequest, load_trace, simulate
from cluster.simulate.trace import block_tokens, chain_of

B = 512  # tokens per trace block
SLOW = TimeModel(prefill_s_per_token=1e-3)  # a 3-block prompt keeps a worker busy ~1.5 s


def req(t, ids, tokens=None, out=0):
    return TraceRequest(t, tokens if tokens is not None else B * len(ids), out, tuple(ids))


def write(tmp_path, rows):
    path = tmp_path / "trace.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(
                {
                    "timestamp": r.arrival_s * 1000,
                    "input_length": r.input_tokens,
                    "output_length": 0,
                    "hash_ids": list(r.hash_ids),
                }
            )
            for r in rows
        )
    )
    return path


def test_chains_share_exactly_the_leading_run():
    a, b, c = (chain_of(req(0, ids)) for ids in ([1, 2, 3], [1, 2, 4], [9, 2, 3]))
    assert a[:2] == b[:2] and a[2] != b[2]
    assert not set(a) & set(c)  # same later ids, different first block: nothing shared
    assert len(chain_of(req(0, [1, 2, 3], tokens=2 * B + 7))) == 2  # the partial block is not cacheable


def test_one_shared_cache_by_hand():
    # far apart in time: each request is done before the next one arrives
    trace = [req(0, [1, 2, 3]), req(100, [1, 2, 4]), req(200, [1, 2, 3])]
    r = simulate(trace, workers=2, capacity_blocks=10, time=SLOW)
    cached = 0 + 2 * B + (3 * B - 1)  # a whole cached prompt recomputes its last token
    assert r[BOUND].hit_rate == pytest.approx(cached / (9 * B))
    assert r["cache_aware"].hit_rate == pytest.approx(cached / (9 * B))  # it follows the prefix
    # round robin alternates: w0 gets [1,2,3] and [1,2,3] (hit), w1 gets [1,2,4] (miss)
    assert r["round_robin"].hit_rate == pytest.approx((3 * B - 1) / (9 * B))


def test_round_robin_without_sharing_hits_nothing():
    trace = [req(i, [100 * i + k for k in range(4)]) for i in range(20)]
    r = simulate(trace, workers=4, capacity_blocks=8)
    assert all(x.hit_rate == 0 for x in r.values())


def test_eviction_limits_the_bound():
    # one shared cache of 2 x 2 = 4 blocks: A (3) then B (3) evicts A's blocks under LRU
    trace = [req(0, [1, 2, 3]), req(10, [7, 8, 9]), req(20, [1, 2, 3])]
    r = simulate(trace, workers=2, capacity_blocks=2, policies=["cache_aware"])
    assert r[BOUND].hit_rate < (3 * B - 1) / (9 * B)
    big = simulate(trace, workers=2, capacity_blocks=3, policies=["cache_aware"])
    assert big[BOUND].hit_rate == pytest.approx((3 * B - 1) / (9 * B))


def test_the_bound_is_never_beaten_without_eviction(tmp_path):
    import random

    rng = random.Random(7)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randint(1, 6))] for _ in range(8)]
    trace = []
    for i in range(300):
        p = rng.choice(prefixes)
        trace.append(req(i * 0.05, p + [10_000 + i] * rng.randint(0, 2), out=rng.randint(0, 50)))
    r = simulate(trace, workers=4, capacity_blocks=1000, time=SLOW)
    for name, x in r.items():
        assert x.hit_rate <= r[BOUND].hit_rate + 1e-12, name
        assert x.requests == 300
    assert r["cache_aware"].hit_rate > r["round_robin"].hit_rate


def test_a_busy_holder_is_fetched_from_and_the_copy_is_counted():
    # a burst on one prefix: the holder's queue costs more than a fetch, so others fetch and keep copies
    hot = list(range(1, 9))
    trace = [req(0, hot)] + [req(10 + 0.01 * i, hot + [500 + i]) for i in range(12)]
    fast_link = TimeModel(prefill_s_per_token=1e-3, transfer_s_per_block=1e-4, transfer_overhead_s=1e-3)
    r = simulate(trace, workers=3, capacity_blocks=100, policies=["cache_aware"], time=fast_link)["cache_aware"]
    assert r.peer_fetches >= 1 and r.fetched_blocks >= 8
    assert r.stored_blocks - r.distinct_blocks >= 8  # the hot prefix is held twice
    # every request after the first is served its 8 hot blocks, locally or fetched
    assert r.hit_rate == pytest.approx(12 * 8 * B / (8 * B + 12 * 9 * B))


def test_bad_trace_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{"timestamp": 1}\n')
    with pytest.raises(TraceError, match="line 2"):
        load_trace(path)


def test_cli_json_is_keyed_by_policy(tmp_path, capsys):
    path = write(tmp_path, [req(0, [1, 2]), req(5, [1, 2, 3])])
    rc = main(["simulate", "--trace", str(path), "--workers", "2", "--capacity-blocks", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert set(out) == {BOUND, "cache_aware", "round_robin", "least_loaded"}
    assert out[BOUND]["hit_rate"] == pytest.approx(2 * B / (5 * B))
    rc = main(["simulate", "--trace", str(path), "--workers", "2", "--capacity-blocks", "4", "--policy", "nope"])
    assert rc == 2 and "choose one of" in capsys.readouterr().err


def test_simulated_workers_evict_copies_first_after_a_refresh():
    from cluster.simulate.index import SimIndex
    from cluster.simulate.worker import SimWorker

    def serve(w, r):
        chain, toks = chain_of(r), block_tokens(r)
        w.finish_prefill(w.start(chain, toks, None, 0), chain, toks)

    index = SimIndex()
    a, b = (SimWorker(n, 3, "lru", index) for n in ("a", "b"))
    only_a, shared = req(0, [1]), req(0, [2])
    serve(a, only_a)  # older, a's alone
    serve(a, shared)
    serve(b, shared)
    assert index.stored - index.distinct == 1
    a.refresh_copies(now=0.0, every_s=2.0)
    serve(a, req(0, [3]))
    serve(a, req(0, [4]))  # one block must go: the copy, though the sole one is older
    assert index.holder_counts(chain_of(shared)) == {chain_of(shared)[0]: 1}
    assert index.holder_counts(chain_of(only_a)) == {chain_of(only_a)[0]: 1}


def test_router_replicas_share_the_index_but_not_their_load_view():
    # 2 replicas alternate: each sees the other's placements only through the index, so hits survive
    trace = [req(0, [1, 2, 3]), req(100, [1, 2, 4]), req(200, [1, 2, 3])]
    one = simulate(trace, workers=2, capacity_blocks=10, policies=["cache_aware"], time=SLOW)
    two = simulate(
        trace, workers=2, capacity_blocks=10, policies=["cache_aware"], time=SLOW, routers=2, affinity="round_robin"
    )
    assert two["cache_aware"].hit_rate == one["cache_aware"].hit_rate == one[BOUND].hit_rate
    with pytest.raises(ValueError):
        simulate(trace, workers=2, capacity_blocks=10, routers=0)


def test_prefix_affinity_sends_one_prefix_to_one_replica():
    from cluster.simulate.run import replica_for

    a, b = chain_of(req(0, [1, 2, 3])), chain_of(req(0, [1, 5]))
    assert {replica_for(a, i, 8, "prefix") for i in range(20)} == {replica_for(b, 0, 8, "prefix")}
    assert {replica_for(a, i, 8, "round_robin") for i in range(8)} == set(range(8))
