"""What several cluster tests check on a live service."""

from __future__ import annotations

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
