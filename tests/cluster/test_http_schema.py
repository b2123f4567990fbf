"""/openapi.json and /docs describe the real API: the request models have exactly the fields
protocol.py accepts, real answers (whole and streamed) validate against the response models, and a
bounded schemathesis run against the live service (a few hundred generated requests, schema-valid
and not, to every operation) gets no server error and only answers its schema describes.
"""

from __future__ import annotations

import collections
import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from cache_store.embedded import free_port
from cluster import Cluster
from cluster.http import protocol, schema
from cluster.http.app import app
from tests.cluster.helpers import http_get

CASES_PER_MODE = 200  # schema-valid cases, then as many invalid ones, spread over every operation
GENERATED_TOKENS = 4  # cases generating more are cut to this: the run checks the API, not the model


@pytest.fixture(scope="module")
def svc(ray_local):
    c = Cluster.start(workers=1, service="t-schema", device_cache_gb=0.05, host_cache_gb=0.05, http_port=free_port())
    yield c
    c.shutdown()


def post(svc, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        svc.http_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def sse(svc, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        svc.http_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = r.read().decode().splitlines()
    return [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]


# ---- the models are protocol's ----------------------------------------------------------------


@pytest.mark.parametrize(
    "model, accepted",
    [
        (schema.ChatCompletionRequest, protocol.CHAT_FIELDS | set(protocol.NEUTRAL) | set(protocol.CHAT_NEUTRAL)),
        (
            schema.CompletionRequest,
            protocol.COMPLETION_FIELDS | set(protocol.NEUTRAL) | set(protocol.COMPLETION_NEUTRAL),
        ),
        (schema.TokenizeCompletionRequest, protocol.TOKENIZE_FIELDS),
        (schema.TokenizeChatRequest, protocol.TOKENIZE_CHAT_FIELDS),
        (schema.DetokenizeRequest, protocol.DETOKENIZE_FIELDS),
        (schema.StreamOptions, set(protocol.STREAM_OPTIONS)),
        (schema.SystemMessage, set(protocol.MESSAGE_FIELDS)),
        (schema.UserMessage, set(protocol.MESSAGE_FIELDS)),
        (schema.AssistantTurn, set(protocol.ASSISTANT_FIELDS)),
    ],
)
def test_request_models_have_exactly_the_fields_the_api_accepts(model, accepted):
    assert set(model.model_fields) == accepted
    assert model.model_json_schema()["additionalProperties"] is False  # unknown fields: 400, as documented


# ---- the live description --------------------------------------------------------------------


def test_openapi_and_docs_describe_the_served_api(svc):
    status, text = http_get(svc.http_url + "/openapi.json")
    assert status == 200
    spec = json.loads(text)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    chat = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert chat["properties"]["model"]["enum"] == ["demo"]  # the served model, filled in by the service
    assert chat["properties"]["temperature"]["anyOf"][1] == {"type": "null"}  # null means the default
    status, page = http_get(svc.http_url + "/docs")
    assert status == 200 and "swagger-ui" in page and "/openapi.json" in page


def test_real_answers_match_the_response_models(svc):
    messages = [{"role": "user", "content": "hello"}]
    schema.ChatCompletion.model_validate(
        post(svc, "/v1/chat/completions", {"model": "demo", "messages": messages, "max_tokens": 3})
    )
    schema.Completion.model_validate(
        post(svc, "/v1/completions", {"model": "demo", "prompt": ["a", "b"], "max_tokens": 2})
    )
    chunks = sse(
        svc,
        "/v1/chat/completions",
        {
            "model": "demo",
            "messages": messages,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert len(chunks) >= 4
    for c in chunks:
        schema.ChatCompletionChunk.model_validate(c)
    for c in sse(svc, "/v1/completions", {"model": "demo", "prompt": "a", "max_tokens": 3, "stream": True}):
        schema.Completion.model_validate(c)
    schema.TokenizeResponse.model_validate(post(svc, "/tokenize", {"messages": messages, "return_token_strs": True}))
    schema.DetokenizeResponse.model_validate(post(svc, "/detokenize", {"tokens": [104, 105]}))
    schema.ResetResponse.model_validate(post(svc, "/reset_prefix_cache", {}))
    for path, model in (("/v1/models", schema.ModelList), ("/health", schema.Health), ("/version", schema.Version)):
        status, text = http_get(svc.http_url + path)
        model.model_validate_json(text)
    status, text = http_get(svc.http_url + "/nothing")
    assert status == 404
    schema.ErrorBody.model_validate_json(text)


# ---- schemathesis ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(svc):
    return schemathesis.openapi.from_url(svc.http_url + "/openapi.json")


def bounded(case) -> None:
    """A generated completion request asks for at most GENERATED_TOKENS tokens (the default is 512)."""
    body = case.body
    if not (isinstance(body, dict) and case.path in ("/v1/chat/completions", "/v1/completions")):
        return
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int) and not isinstance(body[k], bool) and body[k] > GENERATED_TOKENS:
            body[k] = GENERATED_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = GENERATED_TOKENS
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > GENERATED_TOKENS:
        body["min_tokens"] = GENERATED_TOKENS


CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_answers_conform_event_by_event(svc, api_schema, path):
    """Streams come up in generated cases only by chance: one of each, checked event by event."""
    first = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    body = {**first, "model": "demo", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    response = api_schema[path]["POST"].Case(body=body).call_and_validate(base_url=svc.http_url, checks=CHECKS)
    assert response.status_code == 200 and response.text.count("data: ") >= 4


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_server_error_and_documented_answers(svc, api_schema, mode):
    sent = []

    @given(case=api_schema.as_strategy(mode))
    @settings(max_examples=CASES_PER_MODE, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        bounded(case)
        response = case.call_and_validate(base_url=svc.http_url, checks=CHECKS, timeout=120)
        sent.append((case.operation.label, response.status_code))

    run()
    assert len(sent) >= CASES_PER_MODE // 2  # a few hundred requests in all, to every operation
    operations = {f"{m} {p}" for m, p in schema.endpoints(app)}
    if mode == GenerationMode.NEGATIVE:  # only a body can be invalid: the GET routes take no parameter
        operations = {op for op in operations if op.startswith("POST") and op != "POST /reset_prefix_cache"}
    assert {label for label, _ in sent} == operations
    print(mode, collections.Counter(sent).most_common())
