"""Tenant isolation through the whole service, the embedded Redis' exposure, and the audit mode."""

from __future__ import annotations

import pytest
import redis

from cluster import Cluster
from tests.polling import wait_for

SYSTEM = "Tenant isolation test: same prompt, different tenants. " * 6


@pytest.fixture(scope="module")
def cluster(ray_local):
    c = Cluster.start(workers=2, service="t-sec", device_cache_gb=0.05, host_cache_gb=0.05, audit_fraction=1.0)
    yield c
    c.shutdown()


def test_tenants_never_share_a_block(cluster):
    [a1] = cluster.generate([SYSTEM + "q"], max_new_tokens=4, tenant="acme")
    [b1] = cluster.generate([SYSTEM + "q"], max_new_tokens=4, tenant="globex")
    [a2] = cluster.generate([SYSTEM + "q"], max_new_tokens=4, tenant="acme")
    [b2] = cluster.generate([SYSTEM + "q"], max_new_tokens=4, tenant="globex")
    [plain] = cluster.generate([SYSTEM + "q"], max_new_tokens=4)
    assert a1.cached_tokens == 0 and b1.cached_tokens == 0 and plain.cached_tokens == 0
    assert a2.cached_tokens > 0 and b2.cached_tokens > 0
    assert a1.token_ids == b1.token_ids == a2.token_ids == plain.token_ids  # isolation changes no output


def test_peer_fetch_never_crosses_tenants(cluster):
    long = "Only acme has computed this long prefix so far. " * 25
    [warm] = cluster.generate([long], max_new_tokens=2, tenant="acme")
    burst = cluster.generate([long] * 4, max_new_tokens=2, tenant="globex")  # acme's holder looks attractive
    assert sum(r.cached_peer_tokens for r in burst) == 0
    assert min(r.cached_tokens for r in burst) == 0  # globex computed its own copy
    assert all(r.token_ids == warm.token_ids for r in burst)


def test_a_tenant_cannot_choose_its_salt(cluster):
    [r] = cluster.generate(["hi"], max_new_tokens=1, tenant="acme", cache_salt="tenant:guess")
    assert not r.ok and "either a tenant" in r.error


def test_tenant_mode_requires_a_tenant(ray_local):
    c = Cluster.start(workers=1, service="t-tenants", device_cache_gb=0.02, host_cache_gb=0, tenant_mode=True)
    try:
        [no_tenant] = c.generate(["who am I"], max_new_tokens=1)
        [salted] = c.generate(["who am I"], max_new_tokens=1, cache_salt="mine")
        [ok] = c.generate(["who am I"], max_new_tokens=1, tenant="acme")
        assert "tenant mode" in no_tenant.error and "tenant mode" in salted.error and ok.ok
    finally:
        c.shutdown()


def test_embedded_redis_is_local_and_password_protected(cluster):
    url = cluster.redis_url
    assert url.startswith("redis://:") and "@127.0.0.1:" in url
    host_port = url.split("@")[1].split("/")[0]
    host, port = host_port.split(":")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=host, port=int(port)).ping()
    assert redis.Redis.from_url(url).config_get("bind")["bind"] == "127.0.0.1"


def test_audit_rechecks_hits_and_finds_no_mismatch(cluster):
    before = cluster.stats()["totals"]
    results = cluster.generate([SYSTEM + f"audit {i}" for i in range(3)], max_new_tokens=2)
    hits = sum(r.cached_tokens > 0 for r in results)
    assert hits >= 2
    # an audit is queued behind the request it checks, so it lands a step or two after the result

    def audited():
        totals = cluster.stats()["totals"]
        return totals if totals["audit_checked"] - before["audit_checked"] >= hits else None

    after = wait_for(audited, f"audits of the {hits} hits")
    assert after["audit_checked"] - before["audit_checked"] == hits
    assert after["audit_mismatches"] == 0
