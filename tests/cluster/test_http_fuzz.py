"""A mixed batch through the real HTTP stack: many normal greedy requests (whole and streamed) sent
at once with a few carrying extreme but valid parameters (temperature near 0 and at 2, top_p near
0, top_k 1, the most and the longest stop strings, seeds at the integer limits, fixed lengths) and
a few just past the limits. One worker, so they share its batches. Every normal answer equals what
the same request gets alone; every extreme one is answered, or refused with a 400 naming its field.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cache_store.embedded import free_port
from cluster import Cluster
from cluster.http.protocol import INT64_MAX, MAX_STOP_CHARS
from worker.request import MAX_STOP_STRINGS

NORMAL = 16
MAX_TOKENS = 12
LONG_STOPS = [chr(0x41 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]  # never matched, each as long as allowed
# (extra body fields, whether it is valid: 200; else the field the 400 must name)
EXTREMES = [
    ({"temperature": 1e-40}, None),
    ({"temperature": 1e-6, "seed": 1}, None),
    ({"temperature": 2.0, "seed": 0}, None),
    ({"temperature": 2.0, "seed": INT64_MAX}, None),
    ({"temperature": 2.0, "top_p": 1e-9}, None),
    ({"temperature": 2.0, "top_k": 1}, None),
    ({"temperature": 1.0, "top_k": INT64_MAX, "top_p": 1.0}, None),
    ({"stop": LONG_STOPS}, None),
    ({"stop": [chr(c) for c in range(0x61, 0x61 + MAX_STOP_STRINGS)]}, None),  # one letter each: stops early
    ({"ignore_eos": True, "min_tokens": 64, "max_tokens": 64}, None),
    ({"max_tokens": 300, "ignore_eos": True, "temperature": 2.0}, None),
    ({"seed": INT64_MAX + 1}, "seed"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": 2.000001}, "temperature"),
    ({"stop": [*LONG_STOPS, "x"]}, "stop"),
    ({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, "stop"),
    ({"min_tokens": MAX_TOKENS + 1}, "min_tokens"),
]


@pytest.fixture(scope="module")
def svc(ray_local):
    c = Cluster.start(workers=1, service="t-fuzz", device_cache_gb=0.05, host_cache_gb=0.05, http_port=free_port())
    yield c
    c.shutdown()


def send(url: str, body: dict) -> tuple[int, dict | str]:
    """(status, the answer: JSON, or for a stream its text joined, or the error body)."""
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            data = r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if not body.get("stream"):
        return 200, json.loads(data)
    events = [json.loads(x[6:]) for x in data.splitlines() if x.startswith("data: ") and x != "data: [DONE]"]
    errors = [e for e in events if "error" in e]
    return (500, errors[0]) if errors else (200, "".join(e["choices"][0]["text"] for e in events if e["choices"]))


def text_of(answer) -> str:
    return answer if isinstance(answer, str) else answer["choices"][0]["text"]


def normal(i: int, salt: str) -> dict:
    return {
        "model": "demo",
        "prompt": f"Request {i}: tell me about the number {i * 37 % 101}.",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": i % 2 == 1,
        "cache_salt": salt,
    }


def test_extreme_requests_beside_normal_ones_change_no_answer(svc):
    alone = [send(svc.http_url, normal(i, "alone")) for i in range(NORMAL)]
    assert all(status == 200 for status, _ in alone), alone
    jobs = [("normal", i, normal(i, "mixed")) for i in range(NORMAL)]
    for k, (extra, _) in enumerate(EXTREMES):
        body = {"model": "demo", "prompt": f"Extreme {k}.", "max_tokens": MAX_TOKENS, "stream": k % 3 == 0, **extra}
        jobs.append(("extreme", k, body))
    random.Random(20).shuffle(jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they meet in the worker's batches
        answers = list(pool.map(lambda job: send(svc.http_url, job[2]), jobs))
    for (kind, i, body), (status, answer) in zip(jobs, answers):
        if kind == "normal":
            assert status == 200, answer
            assert text_of(answer) == text_of(alone[i][1]), f"normal request {i} changed beside extreme ones"
            continue
        field = EXTREMES[i][1]
        if field is None:
            assert status == 200, (body, answer)
        else:
            assert status == 400 and answer["error"]["param"] == field, (body, answer)
            assert answer["error"]["message"].startswith(f"'{field}'") or field in answer["error"]["message"]
    status, again = send(svc.http_url, normal(1, "alone"))
    assert status == 200 and text_of(again) == text_of(alone[1][1])  # and the service goes on as before
