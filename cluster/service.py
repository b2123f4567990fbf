"""One prefixcache service on a Ray cluster: its settings, its actors' names, finding it.

A service is: N worker actors (one per GPU, or CPU actors), one router
actor, and a Redis index (external, or embedded in a small actor on the
driver's node). Actors are named `<service>:<role>` in the Ray namespace
`prefixcache`, so a client anywhere in the cluster (or via Ray client) finds
the router by name. `cluster.launch` starts and stops the actors; the
router, one of them, reads its settings from here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import ray

from cache_store import DEVICE_CACHE_GB, HOST_CACHE_GB, CacheConfig, redact
from cluster.policies import DEFAULT_POLICY, POLICIES
from worker.actor import NAMESPACE
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


def find_router(service: str = CacheConfig.service):
    try:
        return ray.get_actor(router_name(service), namespace=NAMESPACE)
    except ValueError:
        raise ServiceError(
            f"no prefixcache service {service!r} on this Ray cluster; start one with "
            f"`prefixcache start --address <ray address> --service {service}`"
        ) from None
