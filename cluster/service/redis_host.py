"""The embedded Redis-protocol server as a small Ray actor on the driver's node.

Used when no --redis-url is given: it lives as long as the service (a
detached actor for `prefixcache start`), binds 127.0.0.1 with a random
password, and hands out a URL that carries the password. Single-node
clusters only; a multi-node deployment passes an external Redis URL.
"""

from __future__ import annotations

import ray

from cache_store import EmbeddedRedis


class RedisHost:
    def __init__(self) -> None:
        self.server = EmbeddedRedis().start()

    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.close()


RedisHostActor = ray.remote(RedisHost)
