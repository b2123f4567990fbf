"""Ray names of the service's actors: the one home of the namespace and of a worker actor's name.

Torch-free, so the control plane (router, HTTP ingress, client, launcher) can find workers without
importing the engine."""

from __future__ import annotations

NAMESPACE = "prefixcache"


def worker_actor_name(service: str, worker_id: str) -> str:
    return f"{service}:{worker_id}"
