"""What several cluster tests check on a live service."""

from __future__ import annotations

import http.client
import json
import random
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import openai
import ray

from tests.polling import wait_for
from worker.actor import NAMESPACE, worker_actor_name

# BENCHMARKS.md's sections from `prefixcache bench`'s service part, in order (titles up to " (")
SUITE_HEADINGS = (
    "## Goals",
    "## Shared system prompts",
    "## Multi-turn chats",
    "## No sharing",
    "## Prefix length sweep",
    "## Workers",
)


OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
QUESTION = "The quick brown fox jumps over the lazy dog. Then the fox"  # a completion prompt for the demo model


def cancelled_on_workers(cluster) -> int:
    """Requests the workers cancelled so far, all workers together."""
    return _cancelled(cluster.stats()["workers"])


def wait_cancelled(cluster, expected: int, timeout: float = 30.0) -> None:
    """The workers cancelled `expected` requests in all and hold no pinned block: what a client going
    away mid-request must lead to. Exactly `expected`: no other request was cancelled with it."""

    def settled():
        ws = cluster.stats()["workers"]
        return ws if _cancelled(ws) >= expected and all(w["device_tier"]["pinned"] == 0 for w in ws.values()) else None

    workers = wait_for(settled, f"{expected} cancelled requests in all and no pinned block", timeout)
    assert _cancelled(workers) == expected


def _cancelled(workers: dict) -> int:
    return sum(w["counters"].get("cancelled_requests", 0) for w in workers.values())


def http_get(url: str, token: str | None = None, timeout: float = 30) -> tuple[int, str]:
    """(status, body) of a real HTTP GET, with `token` as a Bearer credential; an error status is
    returned like any other, not raised."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def http_get_json(url: str, token: str | None = None) -> tuple[int, object]:
    status, body = http_get(url, token)
    return status, json.loads(body)


def openai_client(svc) -> openai.OpenAI:
    """The `openai` package's client for the service's API: no retries, so every error is seen."""
    return openai.OpenAI(base_url=svc.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(svc, path: str, body: dict) -> tuple[int, dict]:
    """(status, parsed JSON) of a real HTTP POST of `body` to the service's API."""
    url = urlsplit(svc.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def failed(status_body, status: int, type_: str) -> dict:
    """The error of an answer that must be `status` in OpenAI's shape, with that type."""
    got, body = status_body
    assert got == status, body
    assert set(body["error"]) == OPENAI_ERROR_KEYS and body["error"]["type"] == type_, body
    return body["error"]


def complete(svc, prompt, max_tokens: int = 4, **kw) -> tuple[int, dict]:
    """A greedy /v1/completions of the demo model: (status, parsed JSON)."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    return post(svc, "/v1/completions", body)


def answer(svc, prompt=QUESTION) -> str:
    """The demo model's greedy completion of `prompt`, which must succeed."""
    status, body = complete(svc, prompt)
    assert status == 200, body
    return body["choices"][0]["text"]


def ascii_ids(n: int, seed: int) -> list[int]:
    """n printable ASCII token ids: text to the demo's byte tokenizer, never a special token."""
    rng = random.Random(seed)
    return [rng.randrange(32, 127) for _ in range(n)]


def workers(svc) -> dict[str, dict]:
    """Each worker's live stats (device_tier, counters, ...), by worker id."""
    return svc.stats()["workers"]


def worker_handle(service: str, worker_id: str):
    """The worker's Ray actor (to stop or kill it as the service's own stop does)."""
    return ray.get_actor(worker_actor_name(service, worker_id), namespace=NAMESPACE)
