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

from cache_store.embedded import free_port
from cluster import Cluster

from .helpers import cancelled_on_workers, wait_cancelled

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
    return openai.OpenAI(base_url=svc.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


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
        chat(client, "Describe every country in Europe.", max_tokens=2000, timeout=2.0)
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
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "supported roles"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
        ({"stop": ["a"] * 17}, "stop", "at most 16"),
        ({"seed": -1}, "seed", "integer >= 0"),
        ({"model": None}, "model", "'model' is required"),
        ({"user": 42}, "user", "non-empty string or null"),
    ],
)
def test_bad_fields_are_400s_that_name_them(svc, client, patch, param, words):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    err = error_of(post(svc, "/v1/chat/completions", body), 400)
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


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
