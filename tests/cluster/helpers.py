"""What several cluster tests check on a live service."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.polling import wait_for

# BENCHMARKS.md's sections from `prefixcache bench`'s service part, in order (titles up to " (")
SUITE_HEADINGS = (
    "## Goals",
    "## Shared system prompts",
    "## Multi-turn chats",
    "## No sharing",
    "## Prefix length sweep",
    "## Workers",
)


def cancelled_on_workers(cluster) -> int:
    """Requests the workers cancelled so far, all workers together."""
    return _cancelled(cluster.stats()["workers"])


def wait_cancelled(cluster, expected: int) -> None:
    """The workers cancelled `expected` requests in all and hold no pinned block: what a client going
    away mid-request must lead to. Exactly `expected`: no other request was cancelled with it."""

    def settled():
        ws = cluster.stats()["workers"]
        return ws if _cancelled(ws) >= expected and all(w["device_tier"]["pinned"] == 0 for w in ws.values()) else None

    workers = wait_for(settled, f"{expected} cancelled requests in all and no pinned block")
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
