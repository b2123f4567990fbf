"""SIGTERM stops a foreground command the way Ctrl-C does.

`kill`, systemd, `docker stop` and Kubernetes send SIGTERM. Ray's driver handler for it calls
`sys.exit` from whatever frame runs, and a second one arrives while Ray is tearing down; here the
first SIGTERM raises KeyboardInterrupt in the main thread, so the same `finally` blocks that serve
Ctrl-C stop the HTTP API, the dashboard, the workers and the local Ray, and later ones are ignored
while that clean-up runs. `ray.init` installs its own handler, so enter this after it as well.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; embedded use keeps its own
        return
    fired = False

    def handler(signum, frame) -> None:
        nonlocal fired
        if fired:
            return  # already stopping: let the clean-up finish
        fired = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
