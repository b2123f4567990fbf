from dataclasses import replace

import pytest

from cache_store import CacheConfig, MetadataIndex
from worker.demo_model import demo_block_bytes
from worker.engine import Engine
from worker.request import Request, Result

BAD = [
    ("", "empty or whitespace"),
    ("   \n\t", "empty or whitespace"),
    ([], "empty token list"),
    (None, "must be a string or a list of token ids"),
    ({"text": "hi"}, "must be a string or a list of token ids"),
    (12, "must be a string or a list of token ids"),
    ([1, "a"], "only integers"),
    ([1, True], "only integers"),
    ([5, 259], "outside the vocabulary"),
    ([-1, 5], "outside the vocabulary"),
    ("x" * 8200, "exceeds the model context of 8192"),
]
BAD_PARAMS = [
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=10**6), "exceeds the model context"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(temperature=-0.1), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=-3), "top_k must be an integer >= 0"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(cache_salt=""), "cache_salt must be null or a non-empty string"),
    (dict(stop=("",)), "stop strings must be non-empty"),
]


@pytest.mark.parametrize("prompt,message", BAD, ids=[m for _, m in BAD])
def test_bad_prompt_gets_an_error_for_that_request_only(demo_engine, prompt, message):
    good = "A fine prompt."
    results = demo_engine.generate([good, prompt, good], max_new_tokens=3)
    assert [r.ok for r in results] == [True, False, True]
    assert message in results[1].error
    assert results[1].finish_reason == "error" and results[1].token_ids == ()
    assert results[0].token_ids == results[2].token_ids


@pytest.mark.parametrize("params,message", BAD_PARAMS, ids=[m for _, m in BAD_PARAMS])
def test_bad_parameters_get_a_clear_error(demo_engine, params, message):
    r = demo_engine.run(Request("Hello there", **{"max_new_tokens": 2, **params}))
    assert not r.ok and message in r.error
    assert demo_engine.run(Request("Hello there", max_new_tokens=2)).ok


def test_a_stop_that_is_not_strings_is_named_not_ignored(demo_engine):
    [r] = demo_engine.generate(["Hello there"], max_new_tokens=2, stop=5)
    assert not r.ok and "stop must be a list of at most" in r.error
    assert Request.from_dict({"prompt": "x", "stop": None}).stop == ()  # JSON null: no stop strings
    assert Request.from_dict({"prompt": "x", "stop": 5}).to_dict()["stop"] == 5  # kept for problem() to name


def test_stop_strings_and_finish_reasons(demo_engine):
    [full] = demo_engine.generate(["Stop test prompt"], max_new_tokens=12)
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.text[4:6]
    [cut] = demo_engine.generate(["Stop test prompt"], max_new_tokens=12, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_zero_new_tokens_warms_the_cache(demo_engine):
    prompt = "Warm me up, please. " * 4
    [r] = demo_engine.generate([prompt], max_new_tokens=0)
    assert r.ok and r.token_ids == () and r.text == ""
    [again] = demo_engine.generate([prompt + "and more"], max_new_tokens=1)
    bs = demo_engine.block_size
    assert again.cached_tokens == (len(prompt) // bs) * bs


def test_result_round_trips_through_a_dict(demo_engine):
    [r] = demo_engine.generate(["Round trip"], max_new_tokens=2)
    assert Result.from_dict(r.to_dict()) == r
    req = Request.from_dict({"prompt": "x", "stop": "y", "id": "7"})
    assert req.stop == ("y",) and Request.from_dict(req.to_dict()) == req
    with pytest.raises(ValueError, match="unknown field"):
        Request.from_dict({"prompt": "x", "temprature": 1})


def test_counters_add_up(tmp_path):
    engine = Engine.from_pretrained("demo", device="cpu", device_cache_gb=0.02, host_cache_gb=0)
    prompt = "Counting tokens " * 5
    a, b = engine.generate([prompt, prompt], max_new_tokens=2)
    c = engine.counters.snapshot()
    assert c["requests"] == 2 and c["hit_requests"] == 1
    assert c["prompt_tokens"] == a.prompt_tokens + b.prompt_tokens
    assert c["cached_tokens"] == b.cached_tokens == c["hit_tokens_device"]
    assert c["prefill_tokens"] == c["prompt_tokens"] - c["cached_tokens"]
    assert c["generated_tokens"] == 4


def test_pin_prefix_survives_pressure():
    # 8 device blocks: the running request's KV lives in the same pool, so 3 pinned blocks leave 5
    engine = Engine.from_pretrained(
        "demo", device="cpu", cache_config=CacheConfig(device_bytes=8 * demo_block_bytes(), host_bytes=0)
    )
    system = "You are a careful assistant!" * 2  # 56 bytes = 3 full blocks
    engine.generate([system], max_new_tokens=0)
    assert engine.pin_prefix(system) == 48
    for i in range(6):
        [r] = engine.generate([f"Unrelated prompt number {i} " * 2], max_new_tokens=1)  # 4 blocks each
        assert r.ok, r.error
    assert engine.store.stats().counters["dropped_blocks_device"] > 0
    [r] = engine.generate([system + " question"], max_new_tokens=1)
    assert r.cached_tokens == 48
    assert engine.unpin_prefix(system)


def test_engine_publishes_to_the_index(valkey):
    engine = Engine.from_pretrained(
        "demo", device="cpu", redis_url=valkey.url, worker_id="w-test", device_cache_gb=0.02
    )
    try:
        prompt = "Published prefix, " * 4
        [r] = engine.generate([prompt], max_new_tokens=1)
        index = MetadataIndex(valkey.url)
        chain = engine.chain(engine.tokenize(prompt))
        held = index.holders(chain)
        assert [(h.worker_id, h.blocks) for h in held] == [("w-test", len(chain))]
        engine.keeper.beat()
        assert index.counters(["w-test"])["w-test"]["requests"] == 1
        assert index.leases()["w-test"].fields["fingerprint"] == engine.fingerprint
    finally:
        engine.close()
    assert index.holders(chain) == []


def test_a_different_model_never_hits_in_the_index(valkey, tiny_dirs):
    a = Engine.from_pretrained(str(tiny_dirs["llama"]), device="cpu", redis_url=valkey.url, worker_id="a")
    b = Engine.from_pretrained(str(tiny_dirs["qwen2"]), device="cpu", redis_url=valkey.url, worker_id="b")
    try:
        prompt = "Same prompt, other model. " * 3
        a.generate([prompt], max_new_tokens=1)
        index = MetadataIndex(valkey.url)
        assert index.holders(a.chain(a.tokenize(prompt)))
        assert index.holders(b.chain(b.tokenize(prompt))) == []
    finally:
        a.close()
        b.close()


def test_the_audit_reports_a_corrupted_cached_block():
    engine = Engine.from_pretrained("demo", device="cpu", device_cache_gb=0.05, host_cache_gb=0, audit_fraction=1.0)
    prompt = "An audited system prompt of a few blocks. " * 2
    engine.generate([prompt], max_new_tokens=1)
    engine.generate([prompt + "clean hit"], max_new_tokens=1)
    assert engine.counters.snapshot().get("audit_checked") == 1
    assert engine.counters.snapshot().get("audit_mismatches", 0) == 0
    ids = engine.tokenize(prompt)
    first = engine.store.tree.get(engine.chain(ids)[0])
    engine.store.device_pool.data[first.slot].mul_(-3.0)  # what a wrong block would look like
    engine.generate([prompt + "corrupted hit"], max_new_tokens=1)
    assert engine.counters.snapshot().get("audit_checked") == 2
    assert engine.counters.snapshot().get("audit_mismatches") == 1


def test_an_idle_retiming_lowers_a_start_up_cost_that_noise_inflated():
    engine = Engine.on_own_thread(
        lambda: Engine.from_pretrained("demo", device="cpu", device_cache_gb=0.05, host_cache_gb=0.05)
    )
    try:
        measured = engine.costs.prefill_s_per_token
        engine.costs = replace(engine.costs, prefill_s_per_token=measured * 50)  # as if timed beside a busy process
        refined = engine.refine_prefill_cost()
        assert refined < measured * 10 and engine.costs.prefill_s_per_token == refined
        assert engine.refine_prefill_cost() <= refined  # only ever the minimum
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="needs the engine's step loop"):
        engine.refine_prefill_cost()
