"""Shared fixtures: real Redis-protocol servers (embedded Valkey, and Debian's redis-server when present)."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest

from cache_store import EmbeddedRedis


def _server_params():
    params = [pytest.param(None, id="valkey")]
    binary = shutil.which("redis-server")
    if binary:
        params.append(pytest.param(binary, id="redis-server"))
    elif os.environ.get("PREFIXCACHE_REQUIRE_REDIS_SERVER"):
        raise RuntimeError("PREFIXCACHE_REQUIRE_REDIS_SERVER is set but redis-server is not installed")
    return params


@pytest.fixture(params=_server_params())
def redis_server(request):
    """A fresh password-protected server per test, on every available implementation."""
    with EmbeddedRedis(binary=request.param) as server:
        yield server


@pytest.fixture
def valkey():
    """A fresh embedded Valkey (one implementation: for tests that are not about the server)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (about 6 s to start); stopped at the end.
    `metrics_port` is where Ray exports its Prometheus metrics (ours among them)."""
    import ray

    from cache_store.embedded import free_port

    port = free_port()
    ray.init(
        num_cpus=6,
        include_dashboard=False,
        log_to_driver=False,
        namespace="prefixcache-tests",
        _metrics_export_port=port,
    )
    yield SimpleNamespace(ray=ray, metrics_port=port)
    ray.shutdown()
