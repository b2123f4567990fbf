"""Starting, finding and stopping one prefixcache service on a Ray cluster.

A service is: N worker actors (one per GPU, or CPU actors), one router
actor, and a Redis index (external, or embedded in a small actor on the
driver's node). Actors are named `<service>:<role>` in the Ray namespace
`prefixcache`, so a client anywhere in the cluster (or via Ray client) finds
the router by name. With `detached=True` (what `prefixcache start` uses)
they outlive the process that started them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cache_store import DEVICE_CACHE_GB, HOST_CACHE_GB, CacheConfig, IndexUnavailable, MetadataIndex, redact
from cluster.policies import DEFAULT_POLICY, POLICIES
from worker.actor import NAMESPACE, WorkerActor, worker_actor_name
from worker.config import EngineConfig


class ServiceError(RuntimeError):
    """The service could not start or be found; the message says what to change."""


@dataclass(frozen=True)
class ServiceSpec:
    service: str = CacheConfig.service
    model: str = "demo"
    workers: int = 2
    redis_url: str | None = None  # None: an embedded Valkey on the driver's node
    device_cache_gb: float = DEVICE_CACHE_GB
    host_cache_gb: float = HOST_CACHE_GB
    block_size: int = CacheConfig.block_size
    eviction: str = CacheConfig.eviction
    policy: str = DEFAULT_POLICY
    dtype: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_restarts: int = 2
    detached: bool = False
    lease_ttl_s: float = CacheConfig.lease_ttl_s
    heartbeat_s: float = CacheConfig.heartbeat_s
    tenant_mode: bool = False  # every request names a tenant; the service derives its cache salt
    audit_fraction: float = 0.0  # share of cache hits re-computed without the cache and compared
    max_running: int | None = None  # requests per forward on each worker (None: the device's default)
    max_batch_tokens: int | None = None  # tokens per forward on each worker (None: the device's default)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.service):
            raise ValueError(f"service name must be 1-64 letters, digits, '_', '.', '-', got {self.service!r}")
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 1024:
            raise ValueError(f"workers must be an integer in 1..1024, got {self.workers!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.device_cache_gb <= 0 or self.host_cache_gb < 0:
            raise ValueError("device_cache_gb must be > 0 and host_cache_gb >= 0")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"redis_url must start with redis://, rediss:// or unix://, got {redact(self.redis_url)!r}"
            )
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be in [0, 1], got {self.audit_fraction!r}")
        self.cache_config()  # checks block size, eviction and timings
        self.engine_config().check()

    def cache_config(self) -> CacheConfig:
        return CacheConfig.from_gb(
            self.device_cache_gb,
            self.host_cache_gb,
            block_size=self.block_size,
            eviction=self.eviction,
            service=self.service,
            lease_ttl_s=self.lease_ttl_s,
            heartbeat_s=self.heartbeat_s,
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(max_running=self.max_running, max_batch_tokens=self.max_batch_tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ServiceSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def router_name(service: str) -> str:
    return f"{service}:router"


def redis_name(service: str) -> str:
    return f"{service}:redis"


def worker_ids(n: int, start: int = 0) -> list[str]:
    return [f"worker-{i}" for i in range(start, start + n)]


def find_router(service: str = "default"):
    try:
        return ray.get_actor(router_name(service), namespace=NAMESPACE)
    except ValueError:
        raise ServiceError(
            f"no prefixcache service {service!r} on this Ray cluster; start one with "
            f"`prefixcache start --address <ray address> --service {service}`"
        ) from None


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

    router: Any
    workers: dict[str, Any]
    redis_host: Any | None


def start_service(spec: ServiceSpec) -> Started:
    """Start workers, router and (if no URL) an embedded Redis."""
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
    from cluster.router_actor import RouterActor

    # The router's process starts (and imports) while the workers load their model.
    router = RouterActor.options(
        name=router_name(spec.service), namespace=NAMESPACE, lifetime=lifetime, num_cpus=0, max_restarts=-1
    ).remote(spec.to_dict(), worker_ids(spec.workers), redis_url)
    try:
        check_redis(redis_url, spec.cache_config())
        handles = _start_workers(spec, redis_url, worker_ids(spec.workers), lifetime)
    except BaseException:
        _kill_all([router, *([redis_host] if redis_host else [])])
        raise
    try:
        ray.get(router.start.remote())
    except ray.exceptions.RayError as e:
        _kill_all([router, *handles.values(), *([redis_host] if redis_host else [])])
        raise ServiceError(f"router failed to start: {_cause(e)}") from None
    return Started(router, handles, redis_host)


def _start_embedded_redis(spec: ServiceSpec, lifetime):
    from cluster.redis_host import RedisHostActor

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
            asdict(spec.cache_config()),
            redis_url=redis_url,
            dtype=spec.dtype,
            audit_fraction=spec.audit_fraction,
            engine={"max_running": spec.max_running, "max_batch_tokens": spec.max_batch_tokens},
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
    """Scale out: start n more workers with the service's settings and hand them to the router."""
    router = find_router(service)
    cfg = ray.get(router.config.remote())
    spec = ServiceSpec.from_dict(cfg["spec"])
    existing = cfg["workers"]
    start = max(int(w.rsplit("-", 1)[1]) for w in existing) + 1
    lifetime = "detached" if spec.detached else None
    handles = _start_workers(spec, cfg["redis_url"], worker_ids(n, start), lifetime)
    ray.get(router.add_workers.remote(list(handles)))
    return handles


def stop_service(service: str = "default") -> None:
    """Graceful stop: the HTTP API first (in-flight requests finish), then workers deregister from the
    index, then every actor of the service is killed."""
    from cluster.http.server import stop_http

    router = find_router(service)
    stop_http(service)
    names = ray.get(router.shutdown.remote())
    actors = [router]
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
