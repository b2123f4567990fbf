"""`prefixcache start --http-port` on a running Ray cluster (detached actors, as in production) and
`prefixcache stop`, which removes the HTTP API with the service. Its own module: Ray Serve runs one
HTTP proxy per cluster, so no other module's service may hold it meanwhile."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest
import ray

from cache_store.embedded import free_port
from tests.cluster.helpers import http_get_json
from worker.names import NAMESPACE, worker_actor_name


def test_cli_start_serves_http_and_stop_removes_it(ray_local, capsys):
    """`prefixcache start --http-port --allowed-origins` on a running cluster (detached, like
    production): CORS preflights answered, `reset-prefix-cache` empties the cache; then `stop`."""
    from cluster.cli import main as cli

    port = free_port()
    args = ["--address", "auto", "--service", "t-cli-http"]
    start = [
        "start",
        *args,
        "--workers",
        "1",
        "--device-cache-gb",
        "0.02",
        "--http-port",
        str(port),
        "--attention",
        "sdpa",
    ]
    assert cli.main([*start, "--allowed-origins", "http://app.test"]) == 0
    out = capsys.readouterr().out
    assert f"OpenAI-compatible API: http://127.0.0.1:{port}/v1" in out and "bound to 127.0.0.1 only" in out
    try:
        assert http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200
        worker = ray.get_actor(worker_actor_name("t-cli-http", "worker-0"), namespace=NAMESPACE)
        assert ray.get(worker.info.remote())["attention"] == "sdpa"  # --attention reached the engine
        assert (
            http_get_json(f"http://127.0.0.1:{port}/v1/models")[1]["data"][0]["id"] == "demo"
        )  # no keys: open locally
        preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST"}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("OPTIONS", "/v1/chat/completions", headers=preflight)
        r = conn.getresponse()
        r.read()
        conn.close()
        assert r.status == 200 and r.getheader("access-control-allow-origin") == "http://app.test"
        body = json.dumps({"model": "demo", "prompt": "a prompt of two blocks " * 4, "max_tokens": 1}).encode()
        for _ in range(2):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body)
            urllib.request.urlopen(req, timeout=60).read()
        assert cli.main(["reset-prefix-cache", *args]) == 0
        out = capsys.readouterr().out
        dropped = int(out.split("'t-cli-http': ")[1].split()[0])
        assert dropped > 0 and "worker-0: " in out
    finally:
        assert cli.main(["stop", *args]) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_cli_refuses_bad_allowed_origins_before_starting_anything(ray_local, capsys):
    from cluster.cli import main as cli
    from cluster.service.lookup import find_router
    from cluster.service.spec import ServiceError

    args = ["start", "--address", "auto", "--service", "t-cli-cors", "--http-port", str(free_port())]
    assert cli.main([*args, "--allowed-origins", "app.test"]) == 2
    assert "'app.test' is not an origin; use SCHEME://HOST[:PORT]" in capsys.readouterr().err
    with pytest.raises(ServiceError):
        find_router("t-cli-cors")
