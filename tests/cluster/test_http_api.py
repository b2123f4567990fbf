"""The OpenAI-compatible HTTP API, tried with real clients (the `openai` package, raw HTTP) against a
running service on the real instruct model (smollm2): answers, cache hits reported in
`usage.prompt_tokens_details.cached_tokens`, SSE streaming, a disconnect that frees the request,
and every error class with its status and body; after each bad request the service keeps serving.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache_store.embedded import free_port
from cluster import Cluster
from cluster.http import protocol
from cluster.release import PREFIXCACHE_VERSION

from .helpers import cancelled_on_workers, openai_client, wait_cancelled

README = Path(__file__).resolve().parents[2] / "README.md"
GEOGRAPHY = (
    "You are a geography expert working for a travel magazine. Answer every question in one short, "
    "factual sentence. Do not add greetings, lists or follow-up questions."
)


@pytest.fixture(scope="module")
def svc(ray_local):
    c = Cluster.start(
        workers=2,
        routers=2,  # every request here is dealt to one of two router replicas
        model="smollm2",
        service="t-http",
        device_cache_gb=0.1,
        host_cache_gb=0.1,
        http_port=free_port(),
    )
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def client(svc):
    return openai_client(svc)


def chat(client, question, system=GEOGRAPHY, **kw):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return client.chat.completions.create(
        model="smollm2", messages=messages, **{"temperature": 0, "max_tokens": 32, **kw}
    )


def raw(svc, method, path, body=b"", headers=None):
    """One HTTP exchange with no client library in between: (status, parsed JSON or text)."""
    url = urlsplit(svc.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except json.JSONDecodeError:
        return r.status, data


def post(svc, path, body: dict, **kw):
    return raw(svc, "POST", path, json.dumps(body).encode(), **kw)


def still_serving(client):
    assert chat(client, "Name one ocean.", max_tokens=4).choices[0].message.content


# ---- answers and the cache -------------------------------------------------------------


def test_models_and_health(svc, client):
    [m] = client.models.list().data
    assert m.id == "smollm2" and m.owned_by == "prefixcache"
    status, body = raw(svc, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["workers_alive"] == 2


def test_a_repeated_system_prompt_hits_the_cache_and_changes_no_answer(client):
    first = chat(client, "What is the capital of France?")
    assert first.choices[0].message.content == "The capital of France is Paris."
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # the cache was empty
    other = chat(client, "Which river flows through Vienna?")
    assert other.usage.prompt_tokens_details.cached_tokens >= 16  # the shared system prompt's blocks
    again = chat(client, "What is the capital of France?")
    assert again.usage.prompt_tokens_details.cached_tokens > other.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy: identical
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.completion_tokens == first.usage.completion_tokens
    assert again.usage.total_tokens == again.usage.prompt_tokens + again.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_pieces_with_usage(client):
    whole = chat(client, "What is the capital of Italy?")
    chunks = list(chat(client, "What is the capital of Italy?", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # token by token, not one block at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_and_streaming(client):
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 4
    assert r.choices[0].finish_reason == "length"
    pieces = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == r.choices[0].text
    batch = client.completions.create(model="smollm2", prompt=["One,", "Two,"], max_tokens=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 4


def test_stop_seed_and_concurrent_requests(client):
    r = chat(client, "What is the capital of France?", stop=[" Paris"], user="alice")
    assert r.choices[0].message.content == "The capital of France is" and r.choices[0].finish_reason == "stop"
    a, b = (chat(client, "Name a river.", temperature=0.8, seed=7, max_tokens=8) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content  # a seed makes sampling repeatable
    questions = [f"What is the capital of country number {i}?" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: chat(client, q, max_tokens=6), questions))
    assert all(x.choices[0].message.content for x in answers)


def test_a_streaming_client_that_disconnects_cancels_its_request(svc, client):
    before = cancelled_on_workers(svc)
    stream = chat(client, "Describe every country in Europe.", stream=True, max_tokens=2000)
    next(iter(stream))
    stream.close()  # the HTTP connection goes away mid-answer
    wait_cancelled(svc, before + 1)
    still_serving(client)


def test_a_waiting_client_that_disconnects_cancels_its_request(svc, client):
    before = cancelled_on_workers(svc)
    with pytest.raises(openai.APITimeoutError):  # not streamed: the client gives up and closes the connection
        # EOS ignored: 1,500 tokens take well over the 2 s at any speed this model runs at (an answer
        # that ended at its EOS came back within 2 s once the engine got faster)
        chat(client, "Describe every country in Europe.", max_tokens=1500, timeout=2.0, extra_body={"ignore_eos": True})
    wait_cancelled(svc, before + 1)
    still_serving(client)


# ---- errors: OpenAI's shape, a status that says which kind, a message that says what to change ----


def error_of(status_body, status):
    got, body = status_body
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "patch, param, words",
    [
        ({"temperature": "hot"}, "temperature", "must be a number in [0, 2]"),
        ({"max_tokens": 0}, "max_tokens", "integer >= 1"),
        ({"n": 2}, "n", "would change the result: n=2"),
        ({"logprobs": True}, "logprobs", "would change the result"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "would change the result"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "supported roles"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
        ({"stop": ["a"] * 17}, "stop", "at most 16"),
        ({"seed": -1}, "seed", "integer >= 0"),
        ({"model": None}, "model", "'model' is required"),
        ({"user": 42}, "user", "non-empty string or null"),
        # wrong types and values anywhere in the body, each named
        ({"stream": "yes"}, "stream", "true or false"),
        ({"stop": 5}, "stop", "a string or a list"),
        ({"stop": ["x" * 4097]}, "stop", "at most 4,096"),
        ({"stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage", "true or false"),
        ({"stream": True, "stream_options": {"foo": 1}}, "stream_options", "continuous_usage_stats"),
        ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, "messages[0].name", "non-empty string"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or a list of text parts"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "text part"),
        ({"messages": [{"role": 7, "content": "x"}]}, "messages[0].role", "supported roles"),
        ({"metadata": {"a": 1}}, "metadata", "an object of string values"),
        ({"store": "x"}, "store", "true or false"),
        ({"parallel_tool_calls": 1}, "parallel_tool_calls", "true or false"),
        ({"ignore_eos": 1}, "ignore_eos", "true or false"),
        ({"min_tokens": "2"}, "min_tokens", "integer >= 0"),
        ({"min_tokens": 5}, "min_tokens", "more than max_tokens=2"),
        ({"cache_salt": 5}, "cache_salt", "non-empty string"),
        ({"cache_salt": "s" * 300}, "cache_salt", "at most 256"),
        ({"top_k": 1.5}, "top_k", "must be an integer"),
        ({"top_p": 0}, "top_p", "(0, 1]"),
        ({"temperature": 2.5}, "temperature", "[0, 2]"),
        ({"seed": 2**63}, "seed", "below 2^63"),
        ({"logit_bias": []}, "logit_bias", "would change the result"),
        ({"n": True}, "n", "would change the result"),
        # integers with hundreds of digits
        ({"seed": 10**200}, "seed", "below 2^63"),
        ({"max_tokens": 10**200}, "max_tokens", "below 2^63"),
        ({"max_tokens": None, "max_completion_tokens": -(10**200)}, "max_completion_tokens", "integer >= 1"),
        ({"top_k": 10**200}, "top_k", "below 2^63"),
        ({"min_tokens": 10**200}, "min_tokens", "below 2^63"),
    ],
)
def test_bad_fields_are_400s_that_name_them(svc, client, patch, param, words):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    err = error_of(post(svc, "/v1/chat/completions", body), 400)
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


SURROGATE = b"\\ud800"  # JSON's escape for half a UTF-16 pair: valid JSON, not valid Unicode


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            b'{"model":"smollm2","messages":[{"role":"user","content":"a%sb"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            b'{"model":"smollm2","messages":[{"role":"user","content":"hi","name":"%s"}]}',
            "messages[0].name",
        ),
        (
            "/v1/chat/completions",
            b'{"model":"smollm2","messages":[{"role":"user","content":[{"type":"text","text":"%s"}]}]}',
            "messages[0].content[0].text",
        ),
        (
            "/v1/chat/completions",
            b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"stop":["%s"]}',
            "stop[0]",
        ),
        ("/v1/completions", b'{"model":"smollm2","prompt":"%s"}', "prompt"),
        ("/v1/completions", b'{"model":"smollm2","prompt":["fine","x%s"]}', "prompt[1]"),
        ("/v1/completions", b'{"model":"smollm2","prompt":"hi","user":"%s"}', "user"),
        ("/v1/completions", b'{"model":"smollm2","prompt":"hi","metadata":{"%s":"x"}}', "metadata"),
        ("/tokenize", b'{"prompt":"%s"}', "prompt"),
    ],
)
def test_lone_surrogates_anywhere_are_400s_naming_the_field(svc, client, path, body, param):
    err = error_of(raw(svc, "POST", path, body.replace(b"%s", SURROGATE)), 400)
    assert err["param"] == param and "lone UTF-16 surrogate" in err["message"], err
    still_serving(client)


def test_a_surrogate_pair_is_fine(svc):
    body = b'{"model":"smollm2","prompt":"\\ud83d\\ude00","max_tokens":1}'  # one emoji, as JSON escapes it
    status, out = raw(svc, "POST", "/v1/completions", body)
    assert status == 200 and out["usage"]["completion_tokens"] == 1


def test_integers_too_long_for_any_field_and_deep_nesting_are_400s(svc, client):
    chat_body = b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],'
    err = error_of(raw(svc, "POST", "/v1/chat/completions", chat_body + b'"seed":' + b"9" * 5000 + b"}"), 400)
    assert "thousands of digits" in err["message"]
    err = error_of(post(svc, "/v1/completions", {"model": "smollm2", "prompt": [10**200]}), 400)
    assert "outside the vocabulary" in err["message"]
    deep = chat_body + b'"metadata":' + b'{"a":' * 3000 + b'"x"' + b"}" * 3000 + b"}"
    err = error_of(raw(svc, "POST", "/v1/chat/completions", deep), 400)
    assert "more than 32 levels deep" in err["message"]
    err = error_of(raw(svc, "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000), 400)
    assert "levels deep" in err["message"]
    err = error_of(
        raw(svc, "POST", "/v1/chat/completions", chat_body + b'"metadata":' + b"[" * 40 + b"]" * 40 + b"}"), 400
    )
    assert "levels deep" in err["message"]
    still_serving(client)


def optional_chat_fields() -> set[str]:
    """Every optional field of the chat body (they are all nullable in OpenAI's schema)."""
    return (protocol.CHAT_FIELDS | set(protocol.NEUTRAL) | set(protocol.CHAT_NEUTRAL)) - {"model", "messages"}


def test_null_means_the_default_for_every_optional_field(svc, client):
    plain = chat(client, "What is the capital of France?")
    question = [{"role": "system", "content": GEOGRAPHY}, {"role": "user", "content": "What is the capital of France?"}]
    nulls = dict.fromkeys(optional_chat_fields() - {"temperature", "max_tokens"})
    status, out = post(
        svc,
        "/v1/chat/completions",
        {"model": "smollm2", "messages": question, "temperature": 0, "max_tokens": 32, **nulls},
    )
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == plain.choices[0].message.content
    # sampling parameters left null sample as their defaults do (temperature 1, top_p 1, top_k off)
    sampled = chat(client, "Name a river.", temperature=1.0, top_p=1.0, seed=7, max_tokens=8)
    defaulted = chat(
        client, "Name a river.", temperature=None, top_p=None, seed=7, max_tokens=8, extra_body={"top_k": None}
    )
    assert defaulted.choices[0].message.content == sampled.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:  # a null where a value is required is still named
        client.chat.completions.create(model=None, messages=question)
    assert e.value.body["param"] == "model"


def test_ignore_eos_and_min_tokens_fix_the_output_length(client):
    plain = chat(client, "What is the capital of France?")
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 16  # it ends on EOS
    longer = chat(client, "What is the capital of France?", max_tokens=24, extra_body={"ignore_eos": True})
    assert longer.usage.completion_tokens == 24 and longer.choices[0].finish_reason == "length"
    assert longer.choices[0].message.content.startswith(plain.choices[0].message.content)
    at_least = chat(client, "What is the capital of France?", max_tokens=40, extra_body={"min_tokens": 18})
    assert at_least.usage.completion_tokens >= 18
    assert at_least.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_continuous_usage_stats_put_usage_on_every_chunk(client):
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(chat(client, "What is the capital of Spain?", stream=True, stream_options=options))
    final = chunks[-1].usage
    assert chunks[-1].choices == [] and final.prompt_tokens_details.cached_tokens >= 0
    counted = [c.usage for c in chunks[:-1]]
    assert all(u is not None and u.prompt_tokens == final.prompt_tokens for u in counted)
    done = [u.completion_tokens for u in counted]
    assert done == sorted(done) and done[0] == 0 and done[-1] == final.completion_tokens
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in counted)
    plain = list(chat(client, "What is the capital of Spain?", stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1])  # without it, usage is null until the last chunk


def test_tokenize_and_detokenize_agree_with_what_the_endpoints_run(svc, client):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    status, tok = post(svc, "/tokenize", {"model": "smollm2", "messages": question})
    answer = client.chat.completions.create(model="smollm2", messages=question, max_tokens=1)
    assert status == 200 and tok["count"] == len(tok["tokens"]) == answer.usage.prompt_tokens
    assert tok["max_model_len"] == 8192 and tok["token_strs"] is None
    status, tok = post(svc, "/tokenize", {"prompt": "The capital of France is", "return_token_strs": True})
    done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=1)
    assert tok["count"] == done.usage.prompt_tokens and len(tok["token_strs"]) == tok["count"]
    status, text = post(svc, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and text == {"prompt": "The capital of France is"}
    err = error_of(post(svc, "/detokenize", {"tokens": [-1]}), 400)
    assert err["param"] == "tokens" and "outside the vocabulary" in err["message"]
    err = error_of(post(svc, "/tokenize", {"prompt": "x", "messages": question}), 400)
    assert "not both" in err["message"]
    error_of(post(svc, "/tokenize", {"model": "gpt-4o", "prompt": "x"}), 404)
    status, body = raw(svc, "GET", "/version")
    assert status == 200 and body == {"version": PREFIXCACHE_VERSION}


def scrape(svc) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    status, text = raw(svc, "GET", "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_and_times_and_show_the_cache(svc, client):
    before = scrape(svc)
    ep = (("endpoint", "/v1/chat/completions"),)
    whole = chat(client, "What is the capital of Portugal?")
    streamed = list(
        chat(client, "What is the capital of Portugal?", stream=True, stream_options={"include_usage": True})
    )
    post(svc, "/v1/chat/completions", {"model": "smollm2", "messages": []})  # a 400
    after = scrape(svc)

    def delta(name, labels=ep):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0) - before.get(key, 0)

    usages = [whole.usage, streamed[-1].usage]
    assert delta("prefixcache_http_requests_total", (*ep, ("status", "200"))) == 2
    assert delta("prefixcache_http_requests_total", (*ep, ("status", "400"))) == 1
    assert delta("prefixcache_http_completion_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta("prefixcache_http_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert (
        delta("prefixcache_http_cached_tokens_total") == sum(u.prompt_tokens_details.cached_tokens for u in usages) > 0
    )
    for histogram in ("time_to_first_token", "inter_token_latency", "request_latency"):
        assert delta(f"prefixcache_http_{histogram}_seconds_count") == 2
        assert delta(f"prefixcache_http_{histogram}_seconds_sum") > 0
    # the cluster's cache metrics, as the dashboard serves them
    assert after[("prefixcache_index_up", ())] == 1
    assert ("prefixcache_hit_ratio", (("weight", "tokens"),)) in after
    assert any(name == "prefixcache_cached_tokens_total" for name, _ in after)


def test_cors_is_off_without_allowed_origins(svc):
    preflight = {"Origin": "http://elsewhere.test", "Access-Control-Request-Method": "POST"}
    url = urlsplit(svc.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    assert r.status == 405 and r.getheader("access-control-allow-origin") is None and body["error"]["message"]


def test_reset_prefix_cache_empties_every_worker_and_changes_no_answer(svc, client):  # before the README's
    first = chat(client, "What is the capital of Germany?")
    assert chat(client, "What is the capital of Germany?").usage.prompt_tokens_details.cached_tokens > 0
    status, out = post(svc, "/reset_prefix_cache", {})
    assert status == 200 and set(out["workers"]) == {"worker-0", "worker-1"} and out["blocks_dropped"] > 0
    cold = chat(client, "What is the capital of Germany?")
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == first.choices[0].message.content


def test_unknown_model_is_a_404_and_the_openai_client_says_so(svc, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "'gpt-4o' does not exist" in e.value.message and "smollm2" in e.value.message
    err = error_of(raw(svc, "GET", "/v2/nothing"), 404)
    assert "/v1/chat/completions" in err["message"]
    still_serving(client)


def test_context_overflow_is_a_400_with_the_numbers(svc, client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "word " * 9000)
    err = e.value.body
    assert err["code"] == "context_length_exceeded"
    assert "maximum context length is 8192 tokens" in err["message"] and "in the prompt" in err["message"]
    err = error_of(post(svc, "/v1/completions", {"model": "smollm2", "prompt": "hi", "max_tokens": 9000}), 400)
    assert err["param"] == "max_tokens" and "9001 tokens (1 in the prompt, 9000 for the completion)" in err["message"]
    still_serving(client)


def test_malformed_bodies_get_clear_4xx_and_the_service_keeps_serving(svc, client):
    cases = [
        (b'{"model": "smollm2", "messages": [', 400, "not valid JSON"),
        (b'["model", "smollm2"]', 400, "must be a JSON object"),
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid UTF-8"),
        (b"", 400, "not valid JSON"),
        (b'{"model": "smollm2", "messages": "hi"}', 400, "'messages' must be a non-empty list"),
        (b'{"model": "smollm2", "prompt": {"a": 1}}', 400, None),  # on the chat route: unknown field
    ]
    for body, status, words in cases:
        err = error_of(raw(svc, "POST", "/v1/chat/completions", body), status)
        assert words is None or words in err["message"], err
    err = error_of(raw(svc, "POST", "/v1/completions", b'{"model": "smollm2", "prompt": {"a": 1}}'), 400)
    assert err["param"] == "prompt" and "list of token ids" in err["message"]
    huge = json.dumps({"model": "smollm2", "prompt": "x" * (5 << 20)}).encode()
    err = error_of(raw(svc, "POST", "/v1/completions", huge), 413)
    assert "the limit is 4,194,304" in err["message"]
    err = error_of(post(svc, "/v1/completions", {"model": "smollm2", "prompt": [10**9]}), 400)
    assert "outside the vocabulary" in err["message"]
    still_serving(client)


def test_streaming_errors_before_the_first_token_are_http_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", stream=True, max_tokens=9000)
    assert e.value.body["code"] == "context_length_exceeded"
    still_serving(client)


# ---- the README's examples, as a new user would paste them -----------------------------------


def readme_blocks(lang: str) -> list[str]:
    """Fenced blocks of the README's HTTP API section that talk to the local server."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## HTTP API") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if "127.0.0.1:8000" in b]


def test_readme_curl_examples_run(svc):
    blocks = readme_blocks("sh")
    assert len(blocks) >= 3
    outputs = []
    for block in blocks:
        script = "set -e\n" + block.replace("http://127.0.0.1:8000", svc.http_url)
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert '"error"' not in r.stdout, r.stdout
        outputs.append(r.stdout)
        print(r.stdout)
    chat_out, stream_out, plain_out = outputs[:3]
    assert json.loads(chat_out)["choices"][0]["message"]["content"] == "The capital of France is Paris."
    events = [line[6:] for line in stream_out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] > 0
    assert '"object":"text_completion"' in plain_out and '"object":"list"' in plain_out


def test_readme_python_example_runs(svc, capsys):
    [block] = readme_blocks("python")
    exec(compile(block.replace("http://127.0.0.1:8000", svc.http_url), "README.md", "exec"), {})
    answer, cached = capsys.readouterr().out.rsplit(" ", 1)
    assert answer == "The capital of France is Paris." and int(cached) > 0  # the curl example cached the prompt
