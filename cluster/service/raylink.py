"""Connecting this process to a Ray cluster: one place for the retry rule every entry point shares."""

from __future__ import annotations

import logging
import time

import ray

log = logging.getLogger(__name__)

# Ray client's head proxy starts one server process per client connection. On a busy head (workers
# loading a model, another client just leaving) that start can fail once and succeed a moment later;
# the head answers with one of these (the last: the server process it started had already exited).
# Nothing else is retried: a wrong address or a bad token fails at once, with Ray's own message.
_TRANSIENT_CLIENT_ERRORS = ("Starting Ray client server failed", "Proxy failed to Connect", "psutil.ZombieProcess")


def init_ray(address: str, *, namespace: str, attempts: int = 4, **kwargs) -> None:
    """`ray.init(address=...)`, retrying a `ray://` handshake the head failed transiently (1, 2, 4 s apart)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, namespace=namespace, **kwargs)
            return
        except ConnectionError as e:
            transient = address.startswith("ray://") and any(s in str(e) for s in _TRANSIENT_CLIENT_ERRORS)
            if not transient or attempt == attempts:
                raise
            delay = 2 ** (attempt - 1)
            log.warning("Ray client handshake with %s failed (%s); retrying in %d s", address, e, delay)
            ray.shutdown()
            time.sleep(delay)
