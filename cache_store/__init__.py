"""The cache itself, no Ray: block hashing, prefix tree, tiered KV pools, Redis index.

The KV pools, the tiered store and the lease keeper need torch; they are
imported on first use, so a process that only reads the index (the
dashboard) never loads torch.
"""

import importlib

from cache_store.config import (
    DEVICE_CACHE_GB,
    DISK_CACHE_GB,
    GIB,
    HOST_CACHE_GB,
    CacheConfig,
    default_disk_dir,
    worker_disk_dir,
)
from cache_store.counters import Counters
from cache_store.embedded import EmbeddedRedis
from cache_store.errors import CacheStoreError, ConfigError, Fenced, IndexAuthError, IndexUnavailable, PoolExhausted
from cache_store.hashing import BlockHash, block_chain, block_hash, namespace, root_hash, token_blocks
from cache_store.index import BlockCounts, Holding, MetadataIndex, redact
from cache_store.policy import LFU, LRU, make_policy
from cache_store.tree import DEVICE, DISK, HOST, BlockRef, PrefixTree

_NEEDS_TORCH = {
    "DiskTier": "cache_store.disk",
    "KVPool": "cache_store.kv_pool",
    "KVShape": "cache_store.kv_pool",
    "LeaseKeeper": "cache_store.lease",
    "EMPTY_HOLD": "cache_store.tiered",
    "Exported": "cache_store.tiered",
    "Hold": "cache_store.tiered",
    "StoreStats": "cache_store.tiered",
    "TieredStore": "cache_store.tiered",
    "time_promotion": "cache_store.tiered",
}


def __getattr__(name: str):
    module = _NEEDS_TORCH.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEVICE",
    "DEVICE_CACHE_GB",
    "DISK",
    "DISK_CACHE_GB",
    "EMPTY_HOLD",
    "GIB",
    "HOST",
    "HOST_CACHE_GB",
    "LFU",
    "LRU",
    "BlockCounts",
    "BlockHash",
    "BlockRef",
    "CacheConfig",
    "CacheStoreError",
    "ConfigError",
    "Counters",
    "DiskTier",
    "EmbeddedRedis",
    "Exported",
    "Fenced",
    "Hold",
    "Holding",
    "IndexAuthError",
    "IndexUnavailable",
    "KVPool",
    "KVShape",
    "LeaseKeeper",
    "MetadataIndex",
    "PoolExhausted",
    "PrefixTree",
    "StoreStats",
    "TieredStore",
    "block_chain",
    "block_hash",
    "default_disk_dir",
    "make_policy",
    "namespace",
    "redact",
    "root_hash",
    "time_promotion",
    "token_blocks",
    "worker_disk_dir",
]
