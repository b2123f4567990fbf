"""Request, Result and Chunk: the typed values that cross every layer (engine, actor, router, client, JSONL).

Both are plain frozen dataclasses that round-trip through dicts of builtins
(msgpack / JSON), never pickle. A bad request is never an exception for the
caller of a batch: it comes back as a Result with `error` set and
`finish_reason == "error"`, and the other requests run.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

MAX_SALT_CHARS = 256
MAX_TENANT_CHARS = 256  # a tenant's name (the router derives the tenant's cache salt from it)
MAX_STOP_STRINGS = 16


class ErrorKind(str, enum.Enum):
    """What kind of failure a Result is, set where the failure is created. Callers branch on the
    kind (HTTP status, retries), never on the message, which is for people."""

    BAD_REQUEST = "bad_request"  # the request itself is wrong: the message says what to change
    CONTEXT_EXCEEDED = "context_exceeded"  # too long for the model's context or this worker's KV memory
    UNAVAILABLE = "unavailable"  # no live worker, or the one serving it died: resend later
    SHUTTING_DOWN = "shutting_down"  # the worker is stopping: resend (another worker takes it)
    INTERNAL = "internal"  # a fault of the service (a bug, a device error), not of the request
    CANCELLED = "cancelled"  # the caller went away


class Problem(NamedTuple):
    """Why a request cannot be served, found before it runs."""

    kind: ErrorKind
    message: str


def stop_tuple(stop: Any) -> tuple[str, ...] | Any:
    """`stop` as a Request holds it: one string or a sequence of them becomes a tuple; None is no
    stop; anything else is kept as is for `Request.problem` to name."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop) if isinstance(stop, Sequence) else stop


@dataclass(frozen=True)
class Request:
    """One generation request. `prompt` is text or a list of token ids."""

    prompt: Any
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cache_salt: str | None = None
    id: str | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (fixed output lengths)
    min_tokens: int = 0  # end-of-sequence tokens and stop strings cannot end the output before this

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(known)}")
        if "prompt" not in d:
            raise ValueError('missing "prompt" (text or a list of token ids)')
        d = dict(d)
        if "stop" in d:
            d["stop"] = stop_tuple(d["stop"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop) if isinstance(self.stop, tuple) else self.stop
        return d

    def problem(self) -> str | None:
        """What is wrong with the parameters (model-independent checks), or None."""
        p = self.prompt
        if isinstance(p, str):
            if not p.strip():
                return "prompt is empty or whitespace only; send some text"
        elif isinstance(p, (list, tuple)):
            if not p:
                return "prompt is an empty token list; send at least one token id"
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                return "prompt token list must contain only integers"
        else:
            return f"prompt must be a string or a list of token ids, got {type(p).__name__}"
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            return f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}"
        if not _is_num(self.temperature) or self.temperature < 0:
            return f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}"
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p!r}"
        if not _is_int(self.top_k) or self.top_k < 0:
            return f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            return f"seed must be an integer in [0, 2^63) or null, got {self.seed!r}"
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_STRINGS:
            return f"stop must be a list of at most {MAX_STOP_STRINGS} strings"
        if not all(isinstance(s, str) and s for s in self.stop):
            return "stop strings must be non-empty strings"
        if self.cache_salt is not None:
            if not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= MAX_SALT_CHARS:
                return f"cache_salt must be null or a non-empty string of at most {MAX_SALT_CHARS} characters"
        if self.id is not None and not isinstance(self.id, str):
            return f"id must be a string, got {type(self.id).__name__}"
        if not isinstance(self.ignore_eos, bool):
            return f"ignore_eos must be true or false, got {self.ignore_eos!r}"
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            return (
                f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens!r}"
            )
        return None


@dataclass(frozen=True)
class Result:
    """What one request produced. `token_ids` are the generated tokens only."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose prefill was skipped (device + host + peer)
    worker_id: str
    ttft_s: float  # from the engine taking the request to its first generated token
    id: str | None = None
    finish_reason: str = "length"  # length | stop | eos | error
    latency_s: float = 0.0  # from arrival at the worker to the last token (queue included)
    queue_s: float = 0.0  # waiting on the worker before the engine took it
    cached_device_tokens: int = 0
    cached_host_tokens: int = 0
    cached_peer_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None  # set with `error`
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(
        cls, error: str, kind: ErrorKind, *, id: str | None = None, worker_id: str = "", prompt_tokens: int = 0
    ) -> Result:
        return cls("", (), prompt_tokens, 0, worker_id, 0.0, id=id, finish_reason="error", error=error, error_kind=kind)

    @classmethod
    def refused(cls, problem: Problem, *, id: str | None = None, worker_id: str = "", prompt_tokens: int = 0) -> Result:
        return cls.failed(problem.message, problem.kind, id=id, worker_id=worker_id, prompt_tokens=prompt_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_ids"] = list(self.token_ids)
        d["error_kind"] = None if self.error_kind is None else self.error_kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        d = dict(d)
        d["token_ids"] = tuple(d.get("token_ids", ()))
        kind = d.get("error_kind")
        d["error_kind"] = None if kind is None else ErrorKind(kind)
        return cls(**d)


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output: new text and the token ids it came from. The last chunk of a
    stream carries the request's `result` (text and token_ids of the chunk are then empty). The
    one wire format of streams between worker, router and ingress: `to_dict` / `from_dict`."""

    text: str
    token_ids: tuple[int, ...]
    result: Result | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.result is not None:
            return {"result": self.result.to_dict()}
        return {"text": self.text, "token_ids": list(self.token_ids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        if "result" in d:
            return cls("", (), Result.from_dict(d["result"]))
        return cls(d["text"], tuple(d["token_ids"]))


NO_TOKENS = "prompt tokenizes to no tokens; send some text"


def fits_context(prompt_tokens: int, max_new_tokens: int, max_context: int) -> bool:
    """The context rule: the prompt and every token it may generate fit the model's context."""
    return prompt_tokens + max_new_tokens <= max_context


def prompt_ids_problem(ids: list[int], max_new_tokens: int, vocab_size: int, max_context: int) -> Problem | None:
    """What is wrong with a tokenized prompt for this model (the router and the engine both ask)."""
    if not ids:
        return Problem(ErrorKind.BAD_REQUEST, NO_TOKENS)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        return Problem(
            ErrorKind.BAD_REQUEST,
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); send ids below {vocab_size}",
        )
    if not fits_context(len(ids), max_new_tokens, max_context):
        total = len(ids) + max_new_tokens
        return Problem(
            ErrorKind.CONTEXT_EXCEEDED,
            f"prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}: {total} exceeds the model "
            f"context of {max_context}; shorten the prompt or lower max_new_tokens",
        )
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)
