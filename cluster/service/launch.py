"""Starting, scaling and stopping one prefixcache service on a Ray cluster.

A service is: N worker actors (one per GPU, or CPU actors), R router
actors, and a Redis index (external, or embedded in a small actor on the
driver's node). What a service is made of and where its actors are found
live in `cluster.service.spec` and `.lookup`; this module creates and removes them. With
`detached=True` (what `prefixcache start` uses) they outlive the process
that started them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, NamedTuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cache_store import CacheConfig, IndexUnavailable, MetadataIndex
from cluster.service.lookup import find_router, find_routers
from cluster.service.redis_host import RedisHostActor
from cluster.service.router_actor import RouterActor
from cluster.service.spec import ServiceError, ServiceSpec, redis_name, router_name, worker_ids, worker_index
from worker.names import NAMESPACE, worker_actor_name

log = logging.getLogger(__name__)


def check_redis(url: str, config: CacheConfig) -> None:
    index = MetadataIndex(url, config)
    try:
        index.ping()
    except IndexUnavailable as e:
        raise ServiceError(
            f"{e}. Check --redis-url (host, port, password) or omit it to use an embedded server"
        ) from None
    finally:
        index.close()


class Started(NamedTuple):
    """Handles of a started service. Keep them while the service should live: a non-detached
    actor dies when its last handle goes away."""

    router: Any  # replica 0
    workers: dict[str, Any]
    redis_host: Any | None
    routers: list[Any]  # every replica, replica 0 first


def start_service(spec: ServiceSpec) -> Started:
    """Start workers, router replicas and (if no URL) an embedded Redis."""
    try:
        ray.get_actor(router_name(spec.service), namespace=NAMESPACE)
        raise ServiceError(f"service {spec.service!r} is already running; stop it first or pick another --service")
    except ValueError:
        pass  # not running: go on
    lifetime = "detached" if spec.detached else None
    redis_host = None
    if spec.redis_url is None:
        redis_host = _start_embedded_redis(spec, lifetime)
        redis_url = ray.get(redis_host.url.remote())
    else:
        redis_url = spec.redis_url
    routers: list = []
    try:
        for i in range(spec.routers):  # their processes start (and import) while the workers load their model
            routers.append(
                RouterActor.options(
                    name=router_name(spec.service, i),
                    namespace=NAMESPACE,
                    lifetime=lifetime,
                    num_cpus=0,
                    max_restarts=-1,
                ).remote(spec.to_dict(), worker_ids(spec.workers), redis_url, replica=i)
            )
        check_redis(redis_url, spec.cache_config())
        handles = _start_workers(spec, redis_url, worker_ids(spec.workers), lifetime)
    except BaseException:
        _kill_all([*routers, *([redis_host] if redis_host else [])])
        raise
    try:
        ray.get(routers[0].start.remote())  # replica 0 calibrates transfers first
        ray.get([r.start.remote() for r in routers[1:]])
    except ray.exceptions.RayError as e:
        _kill_all([*routers, *handles.values(), *([redis_host] if redis_host else [])])
        raise ServiceError(f"router failed to start: {_cause(e)}") from None
    return Started(routers[0], handles, redis_host, routers)


def _start_embedded_redis(spec: ServiceSpec, lifetime):
    addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(addresses) > 1:
        raise ServiceError(
            f"this Ray cluster spans {len(addresses)} machines; the embedded Redis only serves one. "
            "Pass --redis-url redis://:PASSWORD@HOST:6379 (see deploy/ for a Redis to run)"
        )
    here = ray.get_runtime_context().get_node_id()
    return RedisHostActor.options(
        name=redis_name(spec.service),
        namespace=NAMESPACE,
        lifetime=lifetime,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote()


def _start_workers(spec: ServiceSpec, redis_url: str, ids: list[str], lifetime) -> dict:
    from worker.actor import WorkerActor  # the engine and torch: imported only where workers are made

    gpus = spec.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    handles = {
        wid: WorkerActor.options(
            name=worker_actor_name(spec.service, wid),
            namespace=NAMESPACE,
            lifetime=lifetime,
            num_cpus=spec.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=spec.max_restarts,
        ).remote(
            wid,
            spec.model,
            asdict(spec.cache_config(wid)),
            redis_url=redis_url,
            dtype=spec.dtype,
            audit_fraction=spec.audit_fraction,
            engine=asdict(spec.engine_config()),
        )
        for wid in ids
    }
    try:
        ray.get([h.health.remote() for h in handles.values()])
    except ray.exceptions.RayError as e:
        _kill_all(handles.values())
        raise ServiceError(f"a worker failed to start: {_cause(e)}") from None
    return handles


def add_workers(service: str, n: int) -> dict[str, Any]:
    """Scale out: start n more workers with the service's settings and hand them to every router."""
    router = find_router(service)
    cfg = ray.get(router.config.remote())
    spec = ServiceSpec.from_dict(cfg["spec"])
    existing = cfg["workers"]
    start = max(worker_index(w) for w in existing) + 1
    lifetime = "detached" if spec.detached else None
    handles = _start_workers(spec, cfg["redis_url"], worker_ids(n, start), lifetime)
    routers = find_routers(service, spec.routers)
    ray.get(routers[0].add_workers.remote(list(handles)))  # replica 0 calibrates their transfers first
    ray.get([r.add_workers.remote(list(handles)) for r in routers[1:]])
    return handles


def reset_prefix_cache(service: str = CacheConfig.service) -> dict:
    """Empty every worker's prefix cache (the router fans it out): {"workers": {id: blocks dropped},
    "failed": {id: why}}."""
    return ray.get(find_router(service).reset_prefix_cache.remote())


def stop_service(service: str = CacheConfig.service) -> None:
    """Graceful stop: the HTTP API first (in-flight requests finish), then workers deregister from the
    index, then every actor of the service is killed."""
    from cluster.http.server import stop_http

    router = find_router(service)
    routers = find_routers(service, ray.get(router.settings.remote())["routers"], missing_ok=True)
    stop_http(service)
    for r in routers[1:]:  # their counters flushed; one that fails to is killed all the same
        try:
            ray.get(r.shutdown.remote())
        except ray.exceptions.RayError as e:
            log.warning("a router replica did not shut down cleanly: %s", _cause(e))
    names = ray.get(router.shutdown.remote())  # replica 0: the workers deregister
    actors = list(routers)
    for name in names:
        try:
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            continue  # already gone
    _kill_all(actors)


def _kill_all(actors) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except ValueError:
            continue  # not an actor any more


def _cause(e: Exception) -> str:
    """The user-facing line of a Ray error (the exception raised inside the actor)."""
    text = str(e)
    for line in reversed(text.splitlines()):
        if "Error:" in line and "ray." not in line.split("Error:")[0]:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__
