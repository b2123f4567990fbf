"""Errors raised by the cache store. Each message says what to change."""


class CacheStoreError(Exception):
    """Base class for cache_store errors."""


class ConfigError(CacheStoreError, ValueError):
    """A cache setting is out of range; the message names the setting and the fix."""


class PoolExhausted(CacheStoreError):
    """A KV pool has fewer free slots than asked for (callers evict first)."""


class IndexUnavailable(CacheStoreError):
    """The Redis metadata index cannot be reached right now.

    Callers degrade on it: the store keeps serving from its local tiers and
    re-publishes its state once the index answers again.
    """


class IndexAuthError(IndexUnavailable):
    """Redis refused our credentials (wrong or missing password / user)."""


class Fenced(CacheStoreError):
    """A newer generation of this worker id holds the lease; this one must stop publishing."""
