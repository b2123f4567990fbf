"""Finding a running service's actors on the Ray cluster by name (`cluster.service.spec` names them)."""

from __future__ import annotations

import ray

from cache_store import CacheConfig
from cluster.service.spec import ServiceError, router_name, worker_index
from worker.names import NAMESPACE, worker_actor_name


def running_worker_ids(service: str) -> list[str]:
    """The service's workers that Ray knows by name now, in start order: how a restarted router
    finds the workers added after its first start."""
    prefix = worker_actor_name(service, "")
    named = ray.util.list_named_actors(all_namespaces=True)  # an actor runs in its job's namespace
    found = [a["name"][len(prefix) :] for a in named if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)]
    return sorted((w for w in found if worker_index(w) is not None), key=worker_index)


def find_router(service: str = CacheConfig.service, replica: int = 0):
    try:
        return ray.get_actor(router_name(service, replica), namespace=NAMESPACE)
    except ValueError:
        raise ServiceError(
            f"no prefixcache service {service!r} on this Ray cluster; start one with "
            f"`prefixcache start --address <ray address> --service {service}`"
        ) from None


def find_routers(service: str, replicas: int, *, missing_ok: bool = False) -> list:
    """Handles of the router replicas, replica 0 first (with `missing_ok`, those still there)."""
    found = []
    for i in range(replicas):
        try:
            found.append(find_router(service, i))
        except ServiceError:
            if not missing_ok:
                raise
    return found
