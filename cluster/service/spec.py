"""One prefixcache service on a Ray cluster: its settings, its actors' names, the deal over routers.

A service is: N worker actors (one per GPU, or CPU actors), R router
actors (replicas sharing the index), and a Redis index (external, or
embedded in a small actor on the driver's node). Actors are named
`<service>:<role>` in the Ray namespace `prefixcache`, so a client anywhere
in the cluster (or via Ray client) finds the routers by name and deals each
request to one of them with `replica_for` (`cluster.service.lookup` finds
them). `cluster.service.launch` starts and stops the actors; the routers
read their settings from here. No Ray here: the CLI parses against it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from cache_store import DEVICE_CACHE_GB, DISK_CACHE_GB, HOST_CACHE_GB, CacheConfig, redact, worker_disk_dir
from cluster.routing.policies import DEFAULT_POLICY, POLICIES
from worker.config import EngineConfig


class ServiceError(RuntimeError):
    """The service could not start or be found; the message says what to change."""


MAX_ROUTERS = 64


@dataclass(frozen=True)
class ServiceSpec:
    service: str = CacheConfig.service
    model: str = "demo"
    workers: int = 2
    routers: int = 1  # router replicas: each places its share of requests (see `replica_for`)
    redis_url: str | None = None  # None: an embedded Valkey on the driver's node
    device_cache_gb: float = DEVICE_CACHE_GB
    host_cache_gb: float = HOST_CACHE_GB
    # A disk tier per worker under this directory (`<dir>/<service>/<worker id>`, on the worker's
    # node), surviving that worker's restarts; None: no disk tier.
    disk_cache_dir: str | None = None
    disk_cache_gb: float = DISK_CACHE_GB
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
    attention: str = EngineConfig.attention  # how each worker's steps attend (worker.config.ATTENTION_MODES)
    linear: str = EngineConfig.linear  # the workers' linear weight layout (worker.config.LINEAR_MODES)
    forward: str = EngineConfig.forward  # the workers' forward code (worker.config.FORWARD_MODES)
    cuda_graphs: str = EngineConfig.cuda_graphs  # decode steps as CUDA graphs (worker.config.CUDA_GRAPHS_MODES)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.service):
            raise ValueError(f"service name must be 1-64 letters, digits, '_', '.', '-', got {self.service!r}")
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 1024:
            raise ValueError(f"workers must be an integer in 1..1024, got {self.workers!r}")
        if not isinstance(self.routers, int) or not 1 <= self.routers <= MAX_ROUTERS:
            raise ValueError(f"routers must be an integer in 1..{MAX_ROUTERS}, got {self.routers!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {self.policy!r}")
        if self.device_cache_gb <= 0 or self.host_cache_gb < 0:
            raise ValueError("device_cache_gb must be > 0 and host_cache_gb >= 0")
        if self.disk_cache_dir is not None and (
            not isinstance(self.disk_cache_dir, str) or not os.path.isabs(self.disk_cache_dir)
        ):
            raise ValueError(
                f"disk_cache_dir must be an absolute directory path (workers run in directories of their own), "
                f"got {self.disk_cache_dir!r}"
            )
        if self.disk_cache_dir is not None and not self.disk_cache_gb > 0:
            raise ValueError(f"disk_cache_gb must be > 0 with a disk_cache_dir, got {self.disk_cache_gb!r}")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"redis_url must start with redis://, rediss:// or unix://, got {redact(self.redis_url)!r}"
            )
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be in [0, 1], got {self.audit_fraction!r}")
        self.cache_config(worker_ids(1)[0])  # checks block size, eviction, timings and the disk tier
        self.engine_config().check()

    def cache_config(self, worker_id: str | None = None) -> CacheConfig:
        """The cache settings of one worker (its own disk directory), or without `worker_id` those
        every part of the service shares (no disk directory)."""
        disk_dir = None
        if self.disk_cache_dir is not None and worker_id is not None:
            disk_dir = worker_disk_dir(self.disk_cache_dir, self.service, worker_id)
        return CacheConfig.from_gb(
            self.device_cache_gb,
            self.host_cache_gb,
            self.disk_cache_gb,
            disk_dir=disk_dir,
            block_size=self.block_size,
            eviction=self.eviction,
            service=self.service,
            lease_ttl_s=self.lease_ttl_s,
            heartbeat_s=self.heartbeat_s,
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_running=self.max_running,
            max_batch_tokens=self.max_batch_tokens,
            attention=self.attention,
            linear=self.linear,
            forward=self.forward,
            cuda_graphs=self.cuda_graphs,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ServiceSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def router_name(service: str, replica: int = 0) -> str:
    """Replica 0 keeps the plain name: it is the one that records history and stops the workers."""
    return f"{service}:router" if replica == 0 else f"{service}:router-{replica}"


def replica_for(prompt: str | Sequence[int], salt: str | None, block_size: int, replicas: int) -> int:
    """The router replica that places a request: a hash of its salt (or tenant) and the start of its
    prompt, so one prefix meets one replica, whose in-flight counts then see its whole burst.

    The start is the first `block_size` token ids, or characters of a text prompt: in ordinary text a
    token spans at least one character, so text prompts that share a first block share these
    characters (text that tokenizes to several tokens per character, e.g. emoji under byte-level
    BPE, can split one prefix over replicas: placement stays right, only less informed). The same
    prompt sent as text (Python client) and as token ids (HTTP API) may meet different replicas."""
    if replicas <= 1 or not isinstance(prompt, (str, Sequence)):
        return 0  # a bad prompt: replica 0 says what is wrong with it
    head = prompt[:block_size]
    text = head if isinstance(head, str) else ",".join(map(str, head))
    key = f"{salt or ''}\x00{text}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % replicas


def router_for(routers: Sequence, prompt, tenant: str | None, cache_salt: str | None, block_size: int):
    """The replica (of `routers`, replica 0 first) that places a request: what the Python client and
    the HTTP API both call. A tenant's requests are dealt by the tenant, the salt the router derives
    from it being secret to the router."""
    salt = tenant if tenant is not None else cache_salt
    return routers[replica_for(prompt, salt, block_size, len(routers))]


def redis_name(service: str) -> str:
    return f"{service}:redis"


def worker_ids(n: int, start: int = 0) -> list[str]:
    return [f"worker-{i}" for i in range(start, start + n)]


def worker_index(worker_id: str) -> int | None:
    """i of an id `worker_ids` made ("worker-<i>"), else None."""
    m = re.fullmatch(r"worker-(\d+)", worker_id)
    return int(m.group(1)) if m else None
