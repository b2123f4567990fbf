"""Workers that stop and die, seen through the HTTP API: a request in flight on a worker that stops
gracefully (what `prefixcache stop` does) is a 503 `shutting_down` saying to resend; the other
worker then serves the same answers; with no worker left, every request is a 503 `unavailable` and
/health says so. (ErrorKind.SHUTTING_DOWN and UNAVAILABLE; the other kinds:
tests/cluster/test_http_error_kinds.py.) A service of its own: this test ends it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from cache_store.embedded import free_port
from cluster import Cluster
from tests.polling import wait_for

from .helpers import QUESTION, answer, ascii_ids, complete, failed, http_get, post, worker_handle, workers


@pytest.fixture
def doomed(ray_local):
    c = Cluster.start(workers=2, model="demo", service="t-kinds-down", device_cache_gb=0.05, http_port=free_port())
    yield c
    c.shutdown()  # past workers that are gone


def test_a_stopping_worker_is_503_shutting_down_and_no_live_worker_is_503(doomed):
    before = answer(doomed)
    long = {"model": "demo", "prompt": ascii_ids(48, seed=4), "max_tokens": 3000, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, doomed, "/v1/completions", long)
        busy = wait_for(
            lambda: [w for w, s in workers(doomed).items() if s["device_tier"]["pinned"]], "the request to run", 120
        )
        stopping = worker_handle(doomed.service, busy[0])
        ray.get(stopping.shutdown.remote())  # the graceful stop `prefixcache stop` does, mid-answer
        err = failed(waiting.result(), 503, "service_unavailable")
    assert err["code"] == "shutting_down" and "resend the request" in err["message"]
    ray.kill(stopping, no_restart=True)  # what the stop does next
    assert answer(doomed) == before  # the other worker serves, the same answer
    [other] = [w for w in ("worker-0", "worker-1") if w != busy[0]]
    ray.kill(worker_handle(doomed.service, other), no_restart=True)
    for stream in (False, True):
        err = failed(complete(doomed, QUESTION, stream=stream), 503, "service_unavailable")
        assert err["code"] == "unavailable" and "worker" in err["message"], err
    assert http_get(doomed.http_url + "/health")[0] == 503
