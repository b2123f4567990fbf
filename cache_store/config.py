"""The one configuration object of the cache store: frozen and checked on creation."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cache_store.errors import ConfigError
from cache_store.policy import POLICIES

GIB = 1 << 30  # users give tier budgets in GiB (CLI, ServiceSpec, Engine.from_pretrained)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class CacheConfig:
    """Sizes and timings of one worker's cache and of its link to the index.

    Budgets are bytes of KV tensors; each tier preallocates
    `budget // bytes_per_block` blocks, so a tier never exceeds its budget.
    A host budget of 0 disables the host tier (spilled blocks are dropped).
    The disk tier is off unless `disk_dir` names a directory (one per worker: it holds that
    worker's slab files and survives its restarts); it reads back through the host tier, so it
    needs a host budget. `disk_queue_bytes` bounds what waits for the disk writer.
    """

    block_size: int = 16
    device_bytes: int = GIB // 2
    host_bytes: int = GIB
    disk_dir: str | None = None
    disk_bytes: int = 8 * GIB
    disk_queue_bytes: int = 64 << 20
    eviction: str = "lru"  # see cache_store.policy for the others and why LRU is the default
    duplicates_first: bool = True  # evict blocks another worker also holds first (policy.DuplicatesFirst)
    service: str = "default"  # Redis key namespace: one per deployment
    lease_ttl_s: float = 10.0  # a worker silent this long stops being routed to
    heartbeat_s: float = 2.0
    redis_timeout_s: float = 1.0  # bounded wait on every index call
    redis_retry_s: float = 2.0  # after a failure, skip Redis this long before probing again

    @classmethod
    def from_gb(cls, device_gb: float, host_gb: float, disk_gb: float | None = None, **settings) -> CacheConfig:
        """Tier budgets in GiB, as users give them; `settings` are the other fields."""
        disk = {} if disk_gb is None else {"disk_bytes": int(disk_gb * GIB)}
        return cls(device_bytes=int(device_gb * GIB), host_bytes=int(host_gb * GIB), **disk, **settings)

    def __post_init__(self) -> None:
        if not (isinstance(self.block_size, int) and 1 <= self.block_size <= 4096):
            raise ConfigError(f"block_size must be an int in 1..4096, got {self.block_size!r}")
        for name in ("device_bytes", "host_bytes", "disk_bytes", "disk_queue_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative int of bytes, got {value!r}")
        if self.device_bytes == 0:
            raise ConfigError("device_bytes must be > 0: the device tier holds every block in use")
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, str) or not self.disk_dir:
                raise ConfigError(f"disk_dir must be a directory path, got {self.disk_dir!r}")
            if self.disk_bytes == 0:
                raise ConfigError("disk_bytes must be > 0 with a disk_dir (or leave disk_dir unset: no disk tier)")
            if self.host_bytes == 0:
                raise ConfigError(
                    "the disk tier reads back through the host tier: give host_bytes > 0 (--host-cache-gb) with a disk_dir"
                )
        if self.eviction not in POLICIES:
            raise ConfigError(f"eviction must be one of {tuple(POLICIES)}, got {self.eviction!r}")
        if not _NAME.match(self.service):
            raise ConfigError(
                f"service must be 1-64 characters of letters, digits, '_', '.', '-', got {self.service!r}"
            )
        if not 0 < self.heartbeat_s < self.lease_ttl_s:
            raise ConfigError(
                f"need 0 < heartbeat_s < lease_ttl_s, got heartbeat_s={self.heartbeat_s}, "
                f"lease_ttl_s={self.lease_ttl_s}"
            )
        for name in ("redis_timeout_s", "redis_retry_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")


# The tier budgets' defaults in GiB, for the interfaces that take GiB.
DEVICE_CACHE_GB = CacheConfig.device_bytes / GIB
HOST_CACHE_GB = CacheConfig.host_bytes / GIB
DISK_CACHE_GB = CacheConfig.disk_bytes / GIB  # used only with a disk directory


def default_disk_dir() -> Path:
    """Where `prefixcache demo` keeps its workers' disk tiers: under the user's cache directory
    ($XDG_CACHE_HOME, else ~/.cache), so a second demo run finds the first one's KV there."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prefixcache" / "kv"


def worker_disk_dir(root: str | os.PathLike, service: str, worker_id: str) -> str:
    """One worker's disk-tier directory under a service's `--disk-cache-dir`: its own (a directory
    serves one process), and the same after a restart of that worker (so it finds its KV again)."""
    return str(Path(root) / service / worker_id)
