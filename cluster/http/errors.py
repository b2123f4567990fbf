"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with its status codes.

Clients written for OpenAI (the `openai` package raises `BadRequestError`, `AuthenticationError`,
`NotFoundError`, ...) branch on the status and read `error.message`; every message says what to change.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from worker.request import ErrorKind, Result

log = logging.getLogger(__name__)
INVALID = "invalid_request_error"


class APIError(Exception):
    """One failed HTTP request; never affects any other request."""

    def __init__(
        self, status: int, message: str, *, type: str = INVALID, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: whatever a message quotes from the request (a lone surrogate
    included) is escaped, so rendering an error can never fail in turn."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def response(e: APIError) -> ErrorResponse:
    return ErrorResponse(e.body(), status_code=e.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return of_kind(ErrorKind.BAD_REQUEST, message, param)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key")


def model_not_found(asked: Any, served: str) -> APIError:
    return APIError(
        404,
        f"The model {asked!r} does not exist on this server; it serves {served!r} (GET /v1/models lists it)",
        param="model",
        code="model_not_found",
    )


def too_large(size: int, limit: int) -> APIError:
    return APIError(
        413, f"request body is {size:,} bytes; the limit is {limit:,}: send a shorter prompt", code="request_too_large"
    )


def context_exceeded(prompt_tokens: int, max_tokens: int, context: int, param: str, prompt_param: str) -> APIError:
    """vLLM's and OpenAI's wording, with the numbers; `param` names what to shorten."""
    return of_kind(
        ErrorKind.CONTEXT_EXCEEDED,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
        f"Shorten the prompt or lower {param}.",
        param if prompt_tokens < context else prompt_param,
    )


# The HTTP status, OpenAI error type and code of each failure kind (worker.request.ErrorKind): the
# one mapping, for failures the engine and router report and for the ingress's own faults alike; the
# message stays for people. A failed result without a kind is a server fault: nothing should make one.
BY_KIND: dict[ErrorKind, tuple[int, str, str | None]] = {
    ErrorKind.BAD_REQUEST: (400, INVALID, None),
    ErrorKind.CONTEXT_EXCEEDED: (400, INVALID, "context_length_exceeded"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable", "unavailable"),
    ErrorKind.SHUTTING_DOWN: (503, "service_unavailable", "shutting_down"),
    ErrorKind.INTERNAL: (500, "server_error", "internal_error"),
    ErrorKind.CANCELLED: (499, "cancelled", "cancelled"),  # nginx's status: the client closed first
}


def status_of(kind: ErrorKind) -> int:
    return BY_KIND[kind][0]


def of_kind(kind: ErrorKind, message: str, param: str | None = None) -> APIError:
    status, type_, code = BY_KIND[kind]
    return APIError(status, message, type=type_, param=param, code=code)


def internal(message: str) -> APIError:
    return of_kind(ErrorKind.INTERNAL, message)


def unavailable(message: str) -> APIError:
    return of_kind(ErrorKind.UNAVAILABLE, message)


def from_result(result: Result) -> APIError:
    """The APIError of a failed Result, by its kind."""
    return of_kind(
        result.error_kind or ErrorKind.INTERNAL, result.error or "internal error: a failure without a message"
    )


def from_validation(e: RequestValidationError) -> APIError:
    """FastAPI's own parameter checks (query and path parameters) as a 400 naming the field."""
    first = (e.errors() or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return bad_request(f"{where or 'the request'}: {first.get('msg', 'invalid')}", param=where)


class CatchAll:
    """ASGI middleware: an exception that escapes a route is a 500 in OpenAI's JSON shape (Starlette
    would answer plain text), logged here with its traceback, which the client never sees. Once a
    response has started (a stream), no status can be sent: the connection closes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                fault = internal(f"internal error in the HTTP API ({type(e).__name__}); the server logged it")
                await response(fault)(scope, receive, send)
