"""The API's error handling and CORS as its app installs them, served by uvicorn and called over
real HTTP without Ray: a fault in a route is a 500 in OpenAI's JSON shape (Starlette would answer
plain text), unknown routes are JSON 404s, and with allowed origins a browser's preflight is
answered (and a refused one is JSON too). The same middleware serves the live API
(tests/cluster/test_http_api.py, test_http_cli.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn
from fastapi import FastAPI

from cluster.http import app as api
from cluster.http import cors
from cluster.http.cors import parse_origins
from cluster.http.errors import from_result
from worker.request import ErrorKind, Result


def faulty_app() -> FastAPI:
    """The API's middleware and exception handlers around routes with real faults."""
    app = FastAPI()
    app.user_middleware = list(api.app.user_middleware)
    app.exception_handlers.update(api.app.exception_handlers)

    @app.get("/v1/fault")
    def fault():
        return {"x": 1 / 0}

    @app.get("/v1/fine")
    def fine():
        return {"ok": True}

    return app


@pytest.fixture(scope="module")
def url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(faulty_app(), log_config=None, log_level="critical", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def call(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_a_fault_in_a_route_is_a_json_500_and_the_next_request_is_served(url):
    status, headers, body = call(url + "/v1/fault")
    assert status == 500 and headers["content-type"] == "application/json"
    assert body["error"]["type"] == "server_error" and "ZeroDivisionError" in body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]
    assert call(url + "/v1/fine")[0] == 200


def test_unknown_routes_and_methods_are_json(url):
    status, _, body = call(url + "/nowhere")
    assert status == 404 and "GET /v1/fine" in body["error"]["message"]
    status, _, body = call(url + "/v1/fine", method="DELETE")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"


@pytest.fixture
def origins():
    cors.configure(parse_origins("http://app.test, http://localhost:3000"))
    yield
    cors.configure(())


def test_allowed_origins_answer_preflights_and_mark_answers(url, origins):
    ask = {
        "Origin": "http://app.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    req = urllib.request.Request(url + "/v1/fine", method="OPTIONS", headers=ask)
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    status, headers, _ = call(url + "/v1/fine", headers={"Origin": "http://localhost:3000"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, headers, _ = call(url + "/v1/fault", headers={"Origin": "http://app.test"})
    assert status == 500 and headers["access-control-allow-origin"] == "http://app.test"  # errors readable too
    status, headers, body = call(
        url + "/v1/fine", "OPTIONS", {"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
    )
    assert (
        status == 400
        and "CORS preflight refused" in body["error"]["message"]
        and "http://app.test" in body["error"]["message"]
    )


def test_without_origins_no_cors_header_is_sent(url):
    status, headers, _ = call(url + "/v1/fine", headers={"Origin": "http://app.test"})
    assert status == 200 and "access-control-allow-origin" not in {k.lower() for k in headers}


@pytest.mark.parametrize(
    "text, origins",
    [
        ("*", ("*",)),
        ('["http://a.test", "https://b.test:8443"]', ("http://a.test", "https://b.test:8443")),
        ("http://a.test/", ("http://a.test",)),
    ],
)
def test_allowed_origins_forms(text, origins):
    assert parse_origins(text) == origins


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "names no origin"),
        ("a.test", "not an origin"),
        ("http://a.test/path", "no path"),
        ('["x"', "not a JSON list"),
    ],
)
def test_bad_allowed_origins_say_what_to_send(text, words):
    with pytest.raises(ValueError, match=words):
        parse_origins(text)


# The status and OpenAI type each failure kind must reach a client with (issue 22): written out here
# so a change in cluster.http.errors.BY_KIND is a deliberate one.
EXPECTED = {
    ErrorKind.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorKind.CONTEXT_EXCEEDED: (400, "invalid_request_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable"),
    ErrorKind.SHUTTING_DOWN: (503, "service_unavailable"),
    ErrorKind.INTERNAL: (500, "server_error"),
    ErrorKind.CANCELLED: (499, "cancelled"),
}


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.value)
def test_every_failure_kind_has_its_status_whatever_the_message_says(kind):
    for message in ("bad request: x", "internal error in the engine: x", "the worker is shutting down"):
        e = from_result(Result.failed(message, kind))
        assert (e.status, e.type) == EXPECTED[kind] and e.message == message
        assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    assert from_result(Result.failed("x", ErrorKind.CONTEXT_EXCEEDED)).code == "context_length_exceeded"
