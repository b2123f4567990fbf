"""CORS for the API (`--allowed-origins`): off unless the operator names the web origins whose pages
may call it (a page elsewhere then cannot read the answers, as without CORS). With origins set,
browsers' OPTIONS preflights are answered and every answer, errors included, carries the
`Access-Control-Allow-*` headers, through Starlette's CORSMiddleware.

`serve.ingress` freezes the FastAPI app when the module is imported, before any option is known,
so the middleware is installed then and reads this process's origins, which the ingress
replica's constructor sets with `configure` (a replica is one process, serving one service).
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from cluster.http.errors import ErrorResponse, bad_request

_origins: tuple[str, ...] = ()  # this process's; empty: CORS off


def parse_origins(text: str) -> tuple[str, ...]:
    """`--allowed-origins`: comma-separated origins, or a JSON list (vLLM's form); `*` is any origin.
    Raises ValueError saying what is wrong."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--allowed-origins {text!r} is not a JSON list: {e.msg}") from None
        if not isinstance(items, list) or not all(isinstance(o, str) for o in items):
            raise ValueError("--allowed-origins as JSON must be a list of strings")
    else:
        items = text.split(",")
    origins = tuple(o.strip().rstrip("/") for o in items if o.strip())
    if not origins:
        raise ValueError("--allowed-origins names no origin; pass e.g. https://app.example.com or '*'")
    for o in origins:
        if o != "*" and not _is_origin(o):
            raise ValueError(
                f"--allowed-origins: {o!r} is not an origin; use SCHEME://HOST[:PORT] (no path), e.g. "
                "http://localhost:3000, or '*' for any"
            )
    return origins


def _is_origin(o: str) -> bool:
    try:
        u = urlsplit(o)
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return False
    return u.scheme in ("http", "https") and bool(u.hostname) and not (u.path or u.query or u.fragment)


def configure(origins: tuple[str, ...] | list[str] | None) -> None:
    global _origins
    _origins = tuple(origins or ())


class _JSONRefusals(CORSMiddleware):
    """Starlette's CORS, refusing a preflight in OpenAI's JSON shape (Starlette's is plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        why = answer.body.decode(errors="replace")
        allowed = ", ".join(_origins)
        refusal = bad_request(
            f"CORS preflight refused: {why}; this server allows the origins {allowed} (--allowed-origins)"
        )
        kept = {k: v for k, v in answer.headers.items() if k.startswith("access-control-") or k == "vary"}
        return ErrorResponse(refusal.body(), status_code=answer.status_code, headers=kept)


class CORS:
    """ASGI middleware: Starlette's CORSMiddleware for this process's origins, or nothing."""

    def __init__(self, app):
        self.app = app
        self._built: tuple[tuple[str, ...], CORSMiddleware] | None = None

    async def __call__(self, scope, receive, send):
        if not _origins or scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._built is None or self._built[0] != _origins:
            cors = _JSONRefusals(self.app, allow_origins=list(_origins), allow_methods=["*"], allow_headers=["*"])
            self._built = (_origins, cors)
        await self._built[1](scope, receive, send)
