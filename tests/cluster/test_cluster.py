"""The service on a local Ray cluster: real workers, real Redis (Valkey), the demo model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from cache_store import CacheConfig
from cluster import Cluster
from cluster.cli.main import main as cli
from worker.request import Request

from .helpers import cancelled_on_workers, wait_cancelled

SMALL = dict(device_cache_gb=0.05, host_cache_gb=0.05)
BS = CacheConfig.block_size  # what a service caches in unless told otherwise


@pytest.fixture(scope="module")
def cluster(ray_local):
    c = Cluster.start(workers=2, model="demo", service="t-main", **SMALL)
    yield c
    c.shutdown()


def test_generate_fills_every_result_field(cluster):
    [r] = cluster.generate(["Hello from the cluster test."], max_new_tokens=5)
    assert r.ok and len(r.token_ids) == 5 and r.text
    assert r.prompt_tokens == len("Hello from the cluster test.")
    assert r.worker_id in ("worker-0", "worker-1") and r.ttft_s > 0 and r.latency_s >= r.ttft_s
    assert r.extra["placement"] in ("cache", "load")


def test_repeated_prefix_goes_to_its_holder_and_salt_never_hits(cluster):
    system = "You are the holder test assistant. Answer in one line. " * 6
    first = cluster.generate([system + "Q0?"], max_new_tokens=2)[0]
    later = [cluster.generate([system + f"Q{i}?"], max_new_tokens=2)[0] for i in range(1, 4)]
    for r in later:  # one at a time (no load to spread): each lands on the holder
        assert r.worker_id == first.worker_id
        assert r.cached_tokens == (len(system) // BS) * BS
    [salted] = cluster.generate([system + "Q0?"], max_new_tokens=2, cache_salt="tenant-x")
    assert salted.cached_tokens == 0


def test_outputs_equal_a_cold_run(cluster):
    prompt = "Exactness through the router: " * 8
    cold = cluster.generate([prompt], max_new_tokens=12, cache_salt="cold-reference")[0]
    warm1, warm2 = cluster.generate([prompt, prompt], max_new_tokens=12, cache_salt="warm")
    again = cluster.generate([prompt], max_new_tokens=12, cache_salt="warm")[0]
    assert again.cached_tokens > 0
    assert cold.token_ids == warm1.token_ids == warm2.token_ids == again.token_ids


def test_peer_fetch_when_the_holder_is_busy(cluster):
    """A burst sharing a cached prefix, each with its own long question: the holder's queued
    prefill soon costs more than pulling the prefix, so part of the burst runs on the other
    worker with the prefix fetched, and every answer equals the cold one."""
    prompt = "A long prompt that one worker computes and the other pulls. " * 20  # ~1,200 tokens
    questions = [f" Question {i}: " + "why " * 150 for i in range(4)]  # ~600 uncached tokens each
    cold = cluster.generate([prompt + q for q in questions], max_new_tokens=6, cache_salt="peer-cold")
    warm = cluster.generate([prompt], max_new_tokens=6, cache_salt="peer")[0]
    burst = cluster.generate([prompt + q for q in questions], max_new_tokens=6, cache_salt="peer")
    fetched = [r for r in burst if r.cached_peer_tokens > 0]
    assert fetched, [(r.worker_id, r.cached_tokens, r.extra) for r in burst]
    for r in fetched:
        assert r.worker_id != warm.worker_id
        assert r.cached_tokens == r.cached_peer_tokens + r.cached_device_tokens + r.cached_host_tokens
    assert [r.token_ids for r in burst] == [r.token_ids for r in cold]


def test_stats_count_exactly_what_was_sent(cluster):
    before = cluster.stats()["totals"]
    results = cluster.generate([f"Counting request {i} " * 3 for i in range(5)], max_new_tokens=3)
    after = cluster.stats()["totals"]
    assert after["requests"] - before["requests"] == 5
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    assert after["cached_tokens"] - before["cached_tokens"] == sum(r.cached_tokens for r in results)
    assert after["generated_tokens"] - before["generated_tokens"] == 15


def test_submit_jsonl_with_a_bad_line(cluster, tmp_path):
    lines = [
        json.dumps({"prompt": "Batch line one.", "max_new_tokens": 3, "id": "a"}),
        "{not json",
        "",
        json.dumps({"prompt": "Batch line four.", "max_new_tokens": 3, "id": "b"}),
        json.dumps({"prompt": "", "id": "c"}),
        json.dumps(["a list"]),
        json.dumps({"prompt": "x" * 200, "id": "too-long"}),
    ]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    # --max-line-bytes is not a flag: the default limit is large; a long line is tested in test_jsonl
    code = cli(["submit", str(src), "--service", "t-main", "--out", str(out), "--no-progress"])
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 1  # some lines failed
    assert [r["line"] for r in records] == [1, 2, 4, 5, 6, 7]
    by_line = {r["line"]: r for r in records}
    assert by_line[1]["error"] is None and by_line[1]["id"] == "a" and len(by_line[1]["token_ids"]) == 3
    assert "line 2: invalid JSON" in by_line[2]["error"]
    assert by_line[4]["error"] is None
    assert "line 5" in by_line[5]["error"] and "empty" in by_line[5]["error"]
    assert "expected a JSON object" in by_line[6]["error"]
    assert by_line[7]["error"] is None


def test_concurrent_clients_all_complete(cluster):
    def one(i):
        return cluster.generate([f"Client {i % 3} shared prefix text. " * 4 + str(i)], max_new_tokens=2)[0]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(18)))
    assert all(r.ok for r in results)


def test_unknown_cli_flag_and_missing_file_are_usage_errors(tmp_path, capsys):
    assert cli(["submit", "--frobnicate"]) == 2
    assert cli(["submit", str(tmp_path / "nope.jsonl"), "--service", "t-main"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_request_objects_run_directly(cluster):
    [r] = cluster.run([Request("Direct request object", max_new_tokens=2, id="direct")])
    assert r.id == "direct" and r.ok


def test_scale_out_adds_a_serving_worker(cluster):
    assert cluster.add_workers(1) == ["worker-2"]
    assert cluster.config_now()["workers"] == ["worker-0", "worker-1", "worker-2"]
    results = [cluster.generate([f"A brand new prefix number {i}. " * 4], max_new_tokens=1)[0] for i in range(3)]
    assert "worker-2" in {r.worker_id for r in results}  # new prefixes go where the fewest live
    assert cluster.stats()["workers"]["worker-2"]["alive"]


def test_stream_through_the_router_and_a_dropped_stream_frees_its_blocks(cluster):
    prompt = "Streaming through the router, token by token. " * 3
    [full] = cluster.generate([prompt], max_new_tokens=24)
    chunks = list(cluster.stream(prompt, max_new_tokens=24))
    result = chunks[-1].result
    assert result is not None and result.ok and result.token_ids == full.token_ids
    assert "".join(c.text for c in chunks[:-1]) == full.text
    assert len(chunks) > 3  # pieces arrived one by one, not as one block at the end
    assert result.cached_tokens > 0  # the first call cached the prompt

    before = cancelled_on_workers(cluster)
    it = cluster.stream(prompt + " A long answer, please.", max_new_tokens=2000, ignore_eos=True)
    next(it)
    it.close()  # the client went away: the worker cancels the request
    wait_cancelled(cluster, before + 1)
    assert cluster.generate(["still serving"], max_new_tokens=2)[0].ok
