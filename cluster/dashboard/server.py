"""The dashboard's HTTP server: the page (`/`), `/api/stats` (JSON), `/metrics` (Prometheus), `/healthz`.

Standard library HTTP server on a thread; every response is built from one
snapshot of the Redis index (cached for `refresh_s`, so a busy page or
scraper costs Redis a few round trips per second at most). Binds 127.0.0.1
unless told otherwise; with a token, every route but /healthz needs
`Authorization: Bearer TOKEN` (or `?token=` for a browser tab).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cache_store import CacheConfig, IndexUnavailable, MetadataIndex, redact
from cluster.dashboard import metrics
from cluster.dashboard.collect import collect, record_history

log = logging.getLogger(__name__)
STATIC = resources.files("cluster.dashboard") / "static"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
HISTORY_STALE_S = 15.0


class Snapshots:
    """Caches one snapshot for `refresh_s`; remembers the last good one for when Redis goes away."""

    def __init__(self, index: MetadataIndex, refresh_s: float):
        self.index = index
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._snap: dict[str, Any] | None = None
        self._error = ""
        self.last_good: dict[str, Any] | None = None

    def get(self) -> tuple[dict[str, Any] | None, str]:
        with self._lock:
            if time.monotonic() - self._at >= self.refresh_s:
                self._at = time.monotonic()
                try:
                    snap = collect(self.index)
                    self._fill_history(snap)
                    self._snap, self._error, self.last_good = snap, "", snap
                except IndexUnavailable as e:
                    self._snap, self._error = None, str(e)
            return self._snap, self._error

    def _fill_history(self, snap: dict[str, Any]) -> None:
        """If nobody (the router) has sampled lately, sample here so the chart keeps moving."""
        latest = snap["history_cumulative"][-1]["t"] if snap["history_cumulative"] else 0
        if snap["workers"] and time.time() - latest > HISTORY_STALE_S:
            record_history(self.index)


class DashboardServer:
    def __init__(
        self,
        redis_url: str,
        *,
        service: str = "default",
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        refresh_s: float = 1.0,
    ):
        config = CacheConfig(service=service, redis_timeout_s=1.0, redis_retry_s=2.0)
        self.index = MetadataIndex(redis_url, config)
        self.redis_label = redact(redis_url)
        self.snapshots = Snapshots(self.index, refresh_s)
        self.token = token
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e}; pick another --port") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(1.0)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.index.close()

    def authorized(self, header: str | None, query_token: str | None) -> bool:
        if not self.token:
            return True
        given = (header or "").removeprefix("Bearer ").strip() or (query_token or "")
        return hmac.compare_digest(given.encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    app: DashboardServer
    server_version = "prefixcache-dashboard"

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/healthz":
            return self._send(HTTPStatus.OK, b"ok\n", "text/plain")
        token = parse_qs(url.query).get("token", [None])[0]
        if not self.app.authorized(self.headers.get("Authorization"), token):
            return self._send(
                HTTPStatus.UNAUTHORIZED,
                b'{"error": "missing or wrong bearer token"}\n',
                "application/json",
                {"WWW-Authenticate": "Bearer"},
            )
        if url.path == "/api/stats":
            snap, error = self.app.snapshots.get()
            if snap is None:
                body = {
                    "service": self.app.index.config.service,
                    "index_available": False,
                    "error": error,
                    "redis": self.app.redis_label,
                }
                return self._send(HTTPStatus.SERVICE_UNAVAILABLE, _json(body), "application/json")
            return self._send(HTTPStatus.OK, _json(snap), "application/json")
        if url.path == "/metrics":
            snap, _ = self.app.snapshots.get()
            return self._send(HTTPStatus.OK, metrics.render(snap), metrics.CONTENT_TYPE)
        name = "index.html" if url.path in ("/", "/index.html") else url.path.lstrip("/")
        return self._static(name)

    def _static(self, name: str) -> None:
        parts = name.split("/")
        if any(p in ("", "..") or p.startswith(".") for p in parts):
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        f = STATIC.joinpath(*parts)
        if not f.is_file():
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        ctype = next((t for ext, t in TYPES.items() if name.endswith(ext)), "application/octet-stream")
        return self._send(HTTPStatus.OK, f.read_bytes(), ctype, {"Cache-Control": "no-cache"})

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()
