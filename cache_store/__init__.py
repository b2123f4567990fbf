"""The cache itself, no Ray: block hashing, prefix tree, tiered KV pools, Redis index."""

from cache_store.config import DEVICE_CACHE_GB, GIB, HOST_CACHE_GB, CacheConfig
from cache_store.counters import Counters
from cache_store.embedded import EmbeddedRedis
from cache_store.errors import CacheStoreError, ConfigError, Fenced, IndexAuthError, IndexUnavailable, PoolExhausted
from cache_store.hashing import BlockHash, block_chain, block_hash, namespace, root_hash, token_blocks
from cache_store.index import BlockCounts, Holding, MetadataIndex, redact
from cache_store.kv_pool import KVPool, KVShape
from cache_store.lease import LeaseKeeper
from cache_store.policy import LFU, LRU, Priority, make_policy
from cache_store.tiered import EMPTY_HOLD, Exported, Hold, StoreStats, TieredStore, time_promotion
from cache_store.tree import DEVICE, HOST, BlockRef, PrefixTree

__all__ = [
    "DEVICE",
    "DEVICE_CACHE_GB",
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
    "Priority",
    "StoreStats",
    "TieredStore",
    "block_chain",
    "block_hash",
    "make_policy",
    "namespace",
    "redact",
    "root_hash",
    "time_promotion",
    "token_blocks",
]
