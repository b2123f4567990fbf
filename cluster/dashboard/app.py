"""The dashboard's routes: the page (`/`), `/api/stats` (JSON), `/metrics` (Prometheus), `/healthz`.

Every response is built from one shared snapshot (`Snapshots`). With a
token, every route but /healthz needs `Authorization: Bearer TOKEN` (or
`?token=` for a browser tab); the check runs before routing, so without the
token even a missing page answers 401, never 404. Handlers are plain
functions: FastAPI runs them in its thread pool, where the blocking Redis
reads belong.
"""

from __future__ import annotations

import hmac
import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from cluster.dashboard import metrics
from cluster.dashboard.snapshots import Snapshots

STATIC = resources.files("cluster.dashboard") / "static"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def authorized(token: str | None, header: str | None, query_token: str | None) -> bool:
    if not token:
        return True
    given = (header or "").removeprefix("Bearer ").strip() or (query_token or "")
    return hmac.compare_digest(given.encode(), token.encode())


def build_app(snapshots: Snapshots, *, token: str | None, redis_label: str) -> FastAPI:
    app = FastAPI(title="prefixcache dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        header, query = request.headers.get("authorization"), request.query_params.get("token")
        if request.url.path != "/healthz" and not authorized(token, header, query):
            body = b'{"error": "missing or wrong bearer token"}\n'
            response = Response(body, 401, {"WWW-Authenticate": "Bearer"}, media_type="application/json")
        else:
            response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok\n", media_type="text/plain")

    @app.get("/api/stats")
    def stats() -> Response:
        snap, error = snapshots.get()
        if snap is None:
            service = snapshots.index.config.service
            body = {"service": service, "index_available": False, "error": error, "redis": redis_label}
            return Response(_json(body), 503, media_type="application/json")
        return Response(_json(snap), media_type="application/json")

    @app.get("/metrics")
    def prometheus() -> Response:
        snap, _ = snapshots.get()
        return Response(metrics.render(snap), media_type=metrics.CONTENT_TYPE)

    @app.get("/{name:path}")
    def static(name: str) -> Response:
        return _static("index.html" if name in ("", "index.html") else name)

    return app


def _static(name: str) -> Response:
    parts = name.split("/")
    if any(p in ("", "..") or p.startswith(".") for p in parts):
        return Response(b"not found\n", 404, media_type="text/plain")
    f = STATIC.joinpath(*parts)
    if not f.is_file():
        return Response(b"not found\n", 404, media_type="text/plain")
    ctype = next((t for ext, t in TYPES.items() if name.endswith(ext)), "application/octet-stream")
    return Response(f.read_bytes(), headers={"Cache-Control": "no-cache"}, media_type=ctype)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()
