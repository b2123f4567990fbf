"""Request bodies of /v1/chat/completions and /v1/completions -> what the router runs.

Every check names the field and says what to send instead. Parameters the service supports map onto
`worker.request.Request`; parameters it does not support are accepted only at their no-op values
(n=1, presence_penalty=0, logprobs=false, ...), because silently ignoring e.g. n=3 would return a
result the client did not ask for; anything else gets a 400 naming them. Unknown fields are refused
like OpenAI refuses them. `cache_salt` and `top_k` are the vLLM extensions of the same names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from cluster.http.errors import bad_request
from worker.request import MAX_STOP_STRINGS

MAX_BODY_BYTES = 4 << 20  # as cluster.jsonl's line limit
DEFAULT_CHAT_MAX_TOKENS = 512  # capped by what fits in the context; a chat turn usually ends on EOS first
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _none_or(*values):
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


_ANY = lambda v: True  # noqa: E731 (accepted, changes nothing about the result)
# field -> the values that leave the result unchanged
NEUTRAL = {
    "n": _none_or(1),
    "presence_penalty": _none_or(0, 0.0),
    "frequency_penalty": _none_or(0, 0.0),
    "logit_bias": _none_or({}),
    "logprobs": _none_or(False),
    "top_logprobs": _none_or(0),
    "metadata": _ANY,
    "store": _ANY,
    "service_tier": _ANY,
}
CHAT_NEUTRAL = {
    "tools": _none_or([]),
    "tool_choice": _none_or("none"),
    "parallel_tool_calls": _ANY,
    "functions": _none_or([]),
    "function_call": _none_or("none"),
    "response_format": _none_or({"type": "text"}),
    "modalities": _none_or(["text"]),
    "audio": _none_or(),
    "prediction": _none_or(),
    "reasoning_effort": _none_or(),
}
COMPLETION_NEUTRAL = {"echo": _none_or(False), "best_of": _none_or(1), "suffix": _none_or("")}
SUPPORTED = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "cache_salt",
    "user",  # an end-user id for the caller's own records; checked, changes nothing
}


@dataclass
class Parsed:
    """A validated request: what to run and how to answer."""

    model: str
    chat: bool
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
    prompts: list[str | list[int]] = field(default_factory=list)  # completions (one or more)
    max_tokens: int | None = None  # None: the endpoint's default, capped by the context
    max_tokens_param: str = "max_tokens"
    params: dict[str, Any] = field(default_factory=dict)  # Request fields: temperature, top_p, ...
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 encoded JSON") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
            "send a JSON object with Content-Type: application/json"
        ) from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def parse_chat(body: dict[str, Any]) -> Parsed:
    _check_fields(body, SUPPORTED | {"messages", "max_completion_tokens"}, {**NEUTRAL, **CHAT_NEUTRAL})
    p = _common(body, chat=True)
    p.messages = _messages(body.get("messages"))
    a, b = body.get("max_tokens"), body.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    if b is not None:
        p.max_tokens, p.max_tokens_param = _int(b, "max_completion_tokens", low=1), "max_completion_tokens"
    return p


def parse_completion(body: dict[str, Any]) -> Parsed:
    _check_fields(body, SUPPORTED | {"prompt"}, {**NEUTRAL, **COMPLETION_NEUTRAL})
    p = _common(body, chat=False)
    p.prompts = _prompts(body.get("prompt"))
    if p.stream and len(p.prompts) > 1:
        raise bad_request("stream=true takes one prompt per request; send the prompts separately", param="prompt")
    return p


def _check_fields(body: dict[str, Any], supported: set[str], neutral: dict) -> None:
    unknown = sorted(k for k in body if k not in supported and k not in neutral)
    if unknown:
        raise bad_request(
            f"Unrecognized request argument(s) supplied: {', '.join(unknown)}; remove them", param=unknown[0]
        )
    changing = sorted(k for k, ok in neutral.items() if k in body and not ok(body[k]))
    if changing:
        shown = ", ".join(f"{k}={json.dumps(body[k])[:40]}" for k in changing)
        raise bad_request(
            f"unsupported parameter value(s) that would change the result: {shown}. This server generates one "
            "choice per request without penalties, logprobs, tools or response formats; remove them "
            "(or send their defaults)",
            param=changing[0],
        )


def _common(body: dict[str, Any], *, chat: bool) -> Parsed:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the model name from GET /v1/models", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", param="stream")
    p = Parsed(model=model, chat=chat, stream=bool(stream))
    p.include_usage = _stream_options(body.get("stream_options"), p.stream)
    if body.get("max_tokens") is not None:
        p.max_tokens = _int(body["max_tokens"], "max_tokens", low=1)
    p.params = {
        "temperature": _num(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        "top_p": _num(body.get("top_p", 1.0), "top_p", 0.0, 1.0, open_low=True),
        "top_k": max(0, _int(body.get("top_k", 0), "top_k", low=-1)),  # vLLM: -1 = off
        "seed": None if body.get("seed") is None else _int(body["seed"], "seed", low=0),
        "stop": _stop(body.get("stop")),
        "cache_salt": _opt_str(body.get("cache_salt"), "cache_salt"),
    }
    _opt_str(body.get("user"), "user")
    return p


def _stream_options(opts: Any, stream: bool) -> bool:
    if opts is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
        raise bad_request('stream_options must be {"include_usage": true|false}', param="stream_options")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad_request("stream_options.include_usage must be true or false", param="stream_options")
    return usage


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(
                f"{where}.role is {role!r}; supported roles: {', '.join(ROLES)} (no tool messages)", param=where
            )
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra and not (role == "assistant" and set(extra) <= {"refusal"}):
            raise bad_request(f"{where} has unsupported field(s) {extra} (tool calls are not supported)", param=where)
        out.append({"role": ROLES[role], "content": _content(m.get("content"), where, role)})
    return out


def _content(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(
                    f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                    "images and audio are not supported by this model",
                    param=where,
                )
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"{where}.content must be a string or a list of text parts", param=where)


def _prompts(prompt: Any) -> list[str | list[int]]:
    hint = "'prompt' must be a string, a list of strings, a list of token ids, or a list of token id lists"
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(s, str) for s in prompt):
            return list(prompt)
        if all(isinstance(s, list) and s and all(_is_int(t) for t in s) for s in prompt):
            return [list(s) for s in prompt]
    raise bad_request(hint, param="prompt")


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise bad_request(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    return tuple(stop)


def _int(v: Any, name: str, *, low: int) -> int:
    if not _is_int(v) or v < low:
        raise bad_request(f"'{name}' must be an integer >= {low}, got {json.dumps(v)[:40]}", param=name)
    return v


def _num(v: Any, name: str, low: float, high: float, *, open_low: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > high or v < low or (open_low and v == low):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise bad_request(f"'{name}' must be a number in {bounds}, got {json.dumps(v)[:40]}", param=name)
    return float(v)


def _opt_str(v: Any, name: str) -> str | None:
    if v is not None and (not isinstance(v, str) or not v):
        raise bad_request(f"'{name}' must be a non-empty string or null", param=name)
    return v


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
