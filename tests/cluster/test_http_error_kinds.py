"""Every kind of failure (worker.request.ErrorKind) reaches an HTTP client with its own status, in
OpenAI's error shape, whatever its message says: each made where it really happens (the router, the
worker's engine, a worker stopping or dying, a client leaving), on a live service (the demo model,
2 workers), called over real HTTP. An engine fault is the real model's forward raising on one
request's data: a 500, and the service goes on serving the same answers as before. Workers that
stop or die: tests/cluster/test_http_workers_gone.py (a service of its own: they end it).
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cache_store.embedded import free_port
from cluster import Cluster
from tests.polling import wait_for
from worker.demo_model import PAD_ID

from .helpers import (
    QUESTION,
    answer,
    ascii_ids,
    cancelled_on_workers,
    complete,
    failed,
    http_get,
    openai_client,
    wait_cancelled,
    worker_handle,
    workers,
)

MARKER = PAD_ID  # the token whose forward fails once poisoned: a special token no normal prompt has
CONTEXT = 8192  # the demo model's
PATIENCE_S = 120.0  # how long to wait for what the service does in the background, on a loaded machine


@pytest.fixture(scope="module")
def svc(ray_local):
    c = Cluster.start(
        workers=2,
        model="demo",
        service="t-kinds",
        device_cache_gb=0.01,  # ~76 blocks of 16 tokens: a prompt can fit the context and not the KV memory
        host_cache_gb=0.01,
        http_port=free_port(),
    )
    yield c
    c.shutdown()


# ---- made by the router and the worker before anything runs ------------------------------------


def test_a_bad_request_found_by_the_router_is_a_400(svc):
    for stream in (False, True):
        err = failed(complete(svc, [1, 5000], stream=stream), 400, "invalid_request_error")
        assert "outside the vocabulary" in err["message"] and "send ids below 259" in err["message"]
    assert answer(svc)


def test_a_request_beyond_the_kv_memory_is_context_length_exceeded(svc):
    capacity = min(w["device_tier"]["capacity"] for w in workers(svc).values())
    prompt = ascii_ids(capacity * 16 + 32, seed=1)
    assert len(prompt) + 1 < CONTEXT  # it fits the model: only the worker's KV memory refuses it
    for stream in (False, True):
        err = failed(complete(svc, prompt, max_tokens=1, stream=stream), 400, "invalid_request_error")
        assert err["code"] == "context_length_exceeded" and "raise --device-cache-gb" in err["message"], err
    err = failed(complete(svc, "hi", max_tokens=CONTEXT), 400, "invalid_request_error")  # the ingress's check
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert answer(svc)


# ---- an engine fault: the real model's forward raises ----------------------------------------


def _poison(actor, token: int) -> None:
    """(In a worker actor.) Make its model's forward raise whenever `token` is among the inputs, as a
    device fault that one request's data triggers would: a hook on the real embedding layer."""

    def hook(_module, inputs):
        if (inputs[0] == token).any():
            raise RuntimeError(f"device fault on token {token}")

    actor.poison = actor.engine.model.get_input_embeddings().register_forward_pre_hook(hook)


def _cure(actor) -> None:
    actor.poison.remove()


@pytest.fixture
def poisoned(svc):
    """Every worker's model fails on MARKER (through Ray's `__ray_call__`, run on the actor)."""
    handles = [worker_handle(svc.service, w) for w in workers(svc)]
    ray.get([h.__ray_call__.remote(_poison, MARKER) for h in handles])
    yield
    ray.get([h.__ray_call__.remote(_cure) for h in handles])


def test_an_engine_fault_is_a_500_and_the_service_keeps_serving(svc, poisoned):
    plain = svc.generate([QUESTION], max_new_tokens=4)[0]
    assert plain.ok and MARKER not in plain.token_ids  # the normal answer never feeds the marker
    before = answer(svc)
    faulty = [*ascii_ids(40, seed=2), MARKER]
    for stream in (False, True):  # the prefill fails: before the first byte, so a status either way
        err = failed(complete(svc, faulty, stream=stream), 500, "server_error")
        assert "forward pass failed" in err["message"] and f"device fault on token {MARKER}" in err["message"]
        assert err["code"] == "internal_error"
    with pytest.raises(openai.InternalServerError) as e:
        openai_client(svc).completions.create(model="demo", prompt=faulty, max_tokens=4)
    assert e.value.status_code == 500 and "forward pass failed" in e.value.message
    with ThreadPoolExecutor(4) as pool:  # beside faulty requests, in the same batches
        bad = [pool.submit(complete, svc, faulty) for _ in range(2)]
        good = [pool.submit(answer, svc) for _ in range(2)]
        assert [f.result() for f in good] == [before, before]
        assert [f.result()[0] for f in bad] == [500, 500]
    assert answer(svc) == before  # still serving, and the same answer


# ---- a client that goes away -------------------------------------------------------------------


def requests_counted(svc, status: int) -> float:
    """prefixcache_http_requests_total of /v1/completions answered with `status`, from /metrics."""
    code, text = http_get(svc.http_url + "/metrics")
    assert code == 200
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "prefixcache_http_requests_total" and labels == {
                "endpoint": "/v1/completions",
                "status": str(status),
            }:
                return s.value
    return 0.0


def pinned_somewhere(svc) -> bool:
    return any(w["device_tier"]["pinned"] for w in workers(svc).values())


def test_a_client_that_goes_away_is_cancelled_and_counted_499(svc):
    cancelled, gone = cancelled_on_workers(svc), requests_counted(svc, 499)
    url = urlsplit(svc.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    body = {
        "model": "demo",
        "prompt": ascii_ids(48, seed=3),
        "max_tokens": 1150,
        "ignore_eos": True,
    }  # fits 0.01 GB; ~4 s here
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    wait_for(lambda: pinned_somewhere(svc), "the request to run on a worker", PATIENCE_S)
    conn.close()  # waiting for a whole answer, the client leaves
    wait_cancelled(svc, cancelled + 1, PATIENCE_S)
    wait_for(lambda: requests_counted(svc, 499) == gone + 1, "the ingress to count the request as 499", PATIENCE_S)
    assert answer(svc)
