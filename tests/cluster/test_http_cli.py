"""`prefixcache start --http-port` on a running Ray cluster (detached actors, as in production) and
`prefixcache stop`, which removes the HTTP API with the service. Its own module: Ray Serve runs one
HTTP proxy per cluster, so no other module's service may hold it meanwhile."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from cache_store.embedded import free_port
from tests.cluster.helpers import http_get_json


def test_cli_start_serves_http_and_stop_removes_it(ray_local, capsys):
    """`prefixcache start --http-port` on a running cluster (detached, like production), then `stop`."""
    from cluster import cli

    port = free_port()
    args = ["--address", "auto", "--service", "t-cli-http"]
    assert cli.main(["start", *args, "--workers", "1", "--device-cache-gb", "0.02", "--http-port", str(port)]) == 0
    out = capsys.readouterr().out
    assert f"OpenAI-compatible API: http://127.0.0.1:{port}/v1" in out and "bound to 127.0.0.1 only" in out
    try:
        assert http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200
        assert (
            http_get_json(f"http://127.0.0.1:{port}/v1/models")[1]["data"][0]["id"] == "demo"
        )  # no keys: open locally
    finally:
        assert cli.main(["stop", *args]) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
