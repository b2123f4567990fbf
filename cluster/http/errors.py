"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, with its status codes.

Clients written for OpenAI (the `openai` package raises `BadRequestError`, `AuthenticationError`,
`NotFoundError`, ...) branch on the status and read `error.message`; every message says what to change.
"""

from __future__ import annotations

from typing import Any

from worker.request import ErrorKind

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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


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


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="no_live_worker")


def context_exceeded(prompt_tokens: int, max_tokens: int, context: int, param: str, prompt_param: str) -> APIError:
    """vLLM's and OpenAI's wording, with the numbers; `param` names what to shorten."""
    return bad_request(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). "
        f"Shorten the prompt or lower {param}.",
        param=param if prompt_tokens < context else prompt_param,
        code="context_length_exceeded",
    )


# The HTTP status and OpenAI error type of each failure kind (worker.request.ErrorKind); the message
# stays for people. A result without a kind is a server fault: nothing should make one.
_BY_KIND: dict[ErrorKind, tuple[int, str, str | None]] = {
    ErrorKind.BAD_REQUEST: (400, INVALID, None),
    ErrorKind.CONTEXT_EXCEEDED: (400, INVALID, "context_length_exceeded"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable", "no_live_worker"),
    ErrorKind.SHUTTING_DOWN: (503, "service_unavailable", "shutting_down"),
    ErrorKind.INTERNAL: (500, "server_error", None),
    ErrorKind.CANCELLED: (499, "cancelled", None),
}


def from_result(result: dict[str, Any]) -> APIError:
    """The APIError for a Result dict whose `error` is set, by its `error_kind`."""
    kind = result.get("error_kind")
    status, type_, code = _BY_KIND.get(ErrorKind(kind) if kind else ErrorKind.INTERNAL, _BY_KIND[ErrorKind.INTERNAL])
    return APIError(status, result["error"], type=type_, code=code)
