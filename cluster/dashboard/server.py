"""The dashboard's HTTP server: `cluster.dashboard.app` run by uvicorn on a thread.

Binds 127.0.0.1 unless told otherwise. The socket is bound in the
constructor, so a busy port is an error the caller sees at once (not a log
line from a thread), and `port=0` gets a free one.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from cache_store import CacheConfig, MetadataIndex, redact
from cluster.dashboard.app import build_app
from cluster.dashboard.snapshots import Snapshots
from cluster.release import DASHBOARD_PORT

START_TIMEOUT_S = 10.0


class DashboardServer:
    def __init__(
        self,
        redis_url: str,
        *,
        service: str = CacheConfig.service,
        host: str = "127.0.0.1",
        port: int = DASHBOARD_PORT,
        token: str | None = None,
        refresh_s: float = 1.0,
    ):
        config = CacheConfig(service=service, redis_timeout_s=1.0, redis_retry_s=2.0)
        self.index = MetadataIndex(redis_url, config)
        self.snapshots = Snapshots(self.index, refresh_s)
        self.socket = _listen(host, port)
        app = build_app(self.snapshots, token=token, redis_label=redact(redis_url))
        # log_config=None: leave the process's logging as it is; no access log, no Server header
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,
                log_level="warning",
                access_log=False,
                server_header=False,
                timeout_graceful_shutdown=5,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, name="dashboard", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(1.0)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()
        self.index.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e}; pick another --port") from None
    sock.listen(128)
    return sock
