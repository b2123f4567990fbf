"""Dashboard: numbers that match a known workload, Prometheus text, states, auth, and a real browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cache_store import EmbeddedRedis
from cache_store.embedded import free_port
from cluster import Cluster
from cluster.dashboard.server import DashboardServer
from cluster.routing.router import tenant_label
from tests.cluster.helpers import http_get
from tests.polling import wait_for

from . import chromium

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "Dashboard known-workload prefix!!" * 2  # 66 bytes: 4 full blocks + 2


@pytest.fixture(scope="module")
def live(ray_local):
    """A service, a dashboard on it, and a workload whose hit counts are known in advance."""
    c = Cluster.start(workers=2, service="t-dash", device_cache_gb=0.05, host_cache_gb=0.05)
    dash = DashboardServer(c.redis_url, service="t-dash", port=free_port()).start()
    results = [c.generate([PREFIX + f"#{i}"], max_new_tokens=3)[0] for i in range(4)]  # one at a time
    results += [c.generate([PREFIX + f"#{i}"], max_new_tokens=3, cache_salt="tenant-q")[0] for i in range(2)]
    yield c, dash, results
    dash.stop()
    c.shutdown()


def stats_when_flushed(dash, n_requests):
    def ready():
        code, body = http_get(dash.url + "api/stats")
        s = json.loads(body)
        return (
            s
            if code == 200 and s["totals"]["requests"] == n_requests and s["router"].get("routed") == n_requests
            else None
        )

    return wait_for(ready, f"the stats to count {n_requests} routed requests", every=0.5)


def test_api_stats_match_the_requests_sent(live):
    c, dash, results = live
    s = stats_when_flushed(dash, 6)
    t = s["totals"]
    # Known in advance: 4 blocks of prefix; the first request of each namespace is cold.
    assert [r.cached_tokens for r in results] == [0, 64, 64, 64, 0, 64]
    assert t["requests"] == 6 and t["hit_requests"] == 4
    assert t["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    assert t["cached_tokens"] == 256 == t["hit_tokens_device"]
    assert t["hit_rate"] == pytest.approx(256 / t["prompt_tokens"])
    assert s["misses"] == {"never_seen": 128, "evicted": 0, "held_elsewhere": 0}
    tenants = {x["tenant"]: x for x in s["tenants"]}
    salted = tenants[tenant_label("tenant-q")]
    assert "tenant-q" not in json.dumps(s)  # salts are shown hashed, never in clear
    assert (salted["requests"], salted["cached_tokens"]) == (2, 64)
    assert (tenants["none"]["requests"], tenants["none"]["cached_tokens"]) == (4, 192)
    top = {(p["tenant"], p["tokens"]): p for p in s["top_prefixes"]}
    assert top[("none", 64)]["hits"] == 3 and top[(salted["tenant"], 64)]["hits"] == 1
    assert top[("none", 64)]["holders"] == [results[0].worker_id]
    assert {w["worker_id"] for w in s["workers"]} == {"worker-0", "worker-1"}
    assert all(w["alive"] and w["tiers"]["device"]["capacity"] > 0 for w in s["workers"])
    assert sum(w["requests"] for w in s["workers"]) == 6


def test_prometheus_metrics_match(live):
    c, dash, results = live
    stats_when_flushed(dash, 6)
    code, text = http_get(dash.url + "metrics")
    assert code == 200

    def total(name, **labels):
        pat = re.compile(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", re.M)
        out = 0.0
        for lab, value in pat.findall(text):
            got = dict(kv.split("=", 1) for kv in lab.split(","))
            if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
                out += float(value)
        return out

    assert "prefixcache_index_up 1.0" in text
    assert total("prefixcache_requests_total") == 6
    assert total("prefixcache_cached_tokens_total") == 256
    assert total("prefixcache_cached_tokens_total", tier="device") == 256
    assert total("prefixcache_prompt_tokens_total") == sum(r.prompt_tokens for r in results)
    assert total("prefixcache_worker_up") == 2
    assert total("prefixcache_miss_tokens_total", reason="never_seen") == 128
    assert total("prefixcache_tenant_requests_total", tenant=tenant_label("tenant-q")) == 2
    assert total("prefixcache_cache_capacity_blocks", tier="device") > 0


def test_workers_also_report_through_ray_metrics(live, ray_local):
    def exported():
        code, text = http_get(f"http://127.0.0.1:{ray_local.metrics_port}/metrics")
        lines = [
            x for x in text.splitlines() if x.startswith("ray_prefixcache_requests_total{") and 'service="t-dash"' in x
        ]
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines) == 6 and len(lines) == 2

    wait_for(exported, "Ray's export of both workers' request counts (every few seconds)", timeout=60, every=0.5)


def test_grafana_dashboard_uses_only_metrics_we_export(live):
    c, dash, _ = live
    stats_when_flushed(dash, 6)
    _, text = http_get(dash.url + "metrics")
    exported = set(re.findall(r"^(prefixcache_\w+?)(?:\{| )", text, re.M))
    board = json.loads((ROOT / "deploy" / "grafana" / "prefixcache.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(prefixcache_\w+)", e)}
    assert used and used <= exported, used - exported


class _Cells(HTMLParser):
    """Collects text by element id and the attributes of worker rows and the chart."""

    def __init__(self):
        super().__init__()
        self.ids, self.rows, self.chart, self._stack = {}, [], {}, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("data-worker"):
            self.rows.append(a["data-worker"])
        if a.get("id") == "chart":
            self.chart = a
        self._stack.append(a.get("id"))

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._stack and self._stack[-1]:
            self.ids[self._stack[-1]] = self.ids.get(self._stack[-1], "") + data


@pytest.mark.skipif(chromium.binary() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_page_in_a_real_browser(live, tmp_path):
    c, dash, _ = live
    wait_for(
        lambda: len(stats_when_flushed(dash, 6)["history_cumulative"]) >= 2,
        "two points of history",
        timeout=40,
        every=0.5,
    )
    s = json.loads(http_get(dash.url + "api/stats")[1])
    page = _Cells()
    page.feed(chromium.dom(dash.url))
    assert page.chart.get("data-drawn") == "1" and int(page.chart["data-points"]) >= 2
    assert sorted(page.rows) == ["worker-0", "worker-1"]
    assert page.ids["kpi-hit"] == f"{100 * s['totals']['hit_rate']:.1f}%"
    assert page.ids["kpi-requests"] == "6"
    assert page.ids["status"] == "live"
    shot = tmp_path / "dashboard.png"
    chromium.screenshot(dash.url, str(shot), width=1280, height=800)
    phone = tmp_path / "dashboard-phone.png"
    chromium.screenshot(dash.url, str(phone), width=390, height=844)
    assert shot.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    print(f"\nscreenshots: {shot} {phone}")


@pytest.mark.skipif(chromium.binary() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_empty_and_unreachable_states():
    with EmbeddedRedis() as server:
        dash = DashboardServer(server.url, service="nothing-here", port=free_port(), refresh_s=0.2).start()
        try:
            code, body = http_get(dash.url + "api/stats")
            assert code == 200 and json.loads(body)["workers"] == []
            page = _Cells()
            page.feed(chromium.dom(dash.url, budget_ms=3000))
            assert page.ids["status"] == "no data yet"
            server.kill()
            code, body = wait_for(
                lambda: (got := http_get(dash.url + "api/stats"))[0] == 503 and got, "the dashboard to see Redis gone"
            )
            assert code == 503 and json.loads(body)["index_available"] is False
            assert "prefixcache_index_up 0.0" in http_get(dash.url + "metrics")[1]
            page = _Cells()
            page.feed(chromium.dom(dash.url, budget_ms=3000))
            assert page.ids["status"] == "index unreachable"
            assert "Redis index is unreachable" in page.ids["banner"]
            assert server.password not in body
        finally:
            dash.stop()


def test_token_and_bind_address():
    with EmbeddedRedis() as server:
        dash = DashboardServer(server.url, port=free_port(), token="s3cret").start()
        try:
            assert dash.address[0] == "127.0.0.1"
            assert http_get(dash.url + "api/stats")[0] == 401
            assert http_get(dash.url + "metrics")[0] == 401
            assert http_get(dash.url + "api/stats", token="wrong")[0] == 401
            assert http_get(dash.url + "api/stats", token="s3cret")[0] == 200
            assert http_get(dash.url + "api/stats?token=s3cret")[0] == 200
            assert http_get(dash.url + "healthz")[0] == 200
            assert http_get(dash.url + "../../etc/passwd?token=s3cret")[0] == 404
        finally:
            dash.stop()


LIGHT_DASHBOARD = """
import json, sys, urllib.request
import cluster.cli.main, cluster.cli.commands
from cluster.dashboard.server import DashboardServer
dash = DashboardServer(sys.argv[1], port=0).start()
stats = json.loads(urllib.request.urlopen(dash.url + "api/stats", timeout=10).read())
text = urllib.request.urlopen(dash.url + "metrics", timeout=10).read().decode()
dash.stop()
heavy = sorted(m for m in ("torch", "transformers", "ray") if m in sys.modules)
print(json.dumps({"heavy": heavy, "index": stats["index_available"], "up": "prefixcache_index_up 1.0" in text}))
"""


def test_dashboard_runs_without_torch_or_ray():
    """The dashboard needs only Redis: a fresh process that imports the CLI and serves /api/stats and
    /metrics from a live index has imported neither torch, transformers nor Ray."""
    with EmbeddedRedis() as server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, "-c", LIGHT_DASHBOARD, server.url],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"heavy": [], "index": True, "up": True}


def test_busy_port_and_missing_url_are_clear_errors(monkeypatch, capsys):
    from cluster.cli.main import main

    with EmbeddedRedis() as server:
        dash = DashboardServer(server.url, port=free_port()).start()
        try:
            port = dash.address[1]
            with pytest.raises(OSError, match="pick another --port"):
                DashboardServer(server.url, port=port)
        finally:
            dash.stop()
    monkeypatch.delenv("PREFIXCACHE_REDIS_URL", raising=False)
    assert main(["dashboard"]) == 2
    assert "--redis-url" in capsys.readouterr().err
