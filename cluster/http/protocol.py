"""Request bodies of /v1/chat/completions, /v1/completions, /tokenize and /detokenize -> what runs.

Every check names the field and says what to send instead. Parameters the service supports map onto
`worker.request.Request`; parameters it does not support are accepted only at their no-op values
(n=1, presence_penalty=0, logprobs=false, ...), because silently ignoring e.g. n=3 would return a
result the client did not ask for; anything else gets a 400 naming them. Unknown fields are refused
like OpenAI refuses them. `cache_salt`, `top_k`, `ignore_eos`, `min_tokens` and
`stream_options.continuous_usage_stats` are the vLLM extensions of the same names.

`null` is the default for every optional parameter (OpenAI's schema marks them nullable, and clients
send null when their caller passes None). Before any field is read, the whole body is checked once:
every string and key valid Unicode (JSON's `\\ud800` escape can carry a lone surrogate, which no
tokenizer takes), nesting at most MAX_JSON_DEPTH deep, numbers that Python's JSON reader can hold.

This module is the one home of the rules; `schema.py` describes the same bodies for /openapi.json
from the constants and tables here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.http.errors import bad_request
from worker.request import MAX_SALT_CHARS, MAX_STOP_STRINGS

MAX_BODY_BYTES = 4 << 20  # as cluster.cli.jsonl's line limit
MAX_JSON_DEPTH = 32  # the deepest body this API takes is 5 levels (messages[i].content[j].text)
MAX_STOP_CHARS = 4096  # each stop string is matched against the text every step
INT64_MAX = 2**63 - 1  # integers beyond it are refused (seed: as `Request` takes it)
DEFAULT_CHAT_MAX_TOKENS = 512  # capped by what fits in the context; a chat turn usually ends on EOS first
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)  # open below: top_p=0 would keep no token
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = ("role", "content", "name")
ASSISTANT_FIELDS = (*MESSAGE_FIELDS, "refusal")


@dataclass(frozen=True)
class Neutral:
    """A parameter this server does not implement, accepted (and ignored) at the values in `schema`:
    the ones that change nothing. `kind` says what they are when the value is of the wrong type;
    without one, any other value would change the result."""

    schema: dict[str, Any]  # JSON schema of the accepted values; null is always accepted too
    ok: Callable[[Any], bool]
    kind: str | None = None


def only(*values: Any) -> Neutral:
    """Accepted at `values` (of one JSON type) alone; `only()`: at null alone."""
    schema = {"enum": list(values), "type": _json_type(values[0])} if values else {}
    return Neutral(schema, lambda v: any(_same(v, x) for x in values))


def _json_type(x: Any) -> str:
    """JSON Schema's type of `x` (an enum alone would let 0 stand for false in a Python validator)."""
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array")):
        if isinstance(x, t):
            return name
    return "object"


def _same(v: Any, x: Any) -> bool:
    """JSON equality: 0 and 0.0 are the same number; true is not 1."""
    if isinstance(x, bool) or isinstance(v, bool):
        return type(v) is type(x) and v == x
    if isinstance(x, (int, float)):
        return isinstance(v, (int, float)) and v == x
    return type(v) is type(x) and v == x


BOOLEAN = Neutral({"type": "boolean"}, lambda v: isinstance(v, bool), "true or false")
STRING = Neutral({"type": "string"}, lambda v: isinstance(v, str), "a string")
STRING_MAP = Neutral(
    {"type": "object", "additionalProperties": {"type": "string"}},
    lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "an object of string values",
)

# field -> the values that leave the result unchanged
NEUTRAL = {
    "n": only(1),
    "presence_penalty": only(0),
    "frequency_penalty": only(0),
    "logit_bias": only({}),
    "logprobs": only(False),
    "top_logprobs": only(0),
    "metadata": STRING_MAP,
    "store": BOOLEAN,
    "service_tier": STRING,
}
CHAT_NEUTRAL = {
    "tools": only([]),
    "tool_choice": only("none"),
    "parallel_tool_calls": BOOLEAN,
    "functions": only([]),
    "function_call": only("none"),
    "response_format": only({"type": "text"}),
    "modalities": only(["text"]),
    "audio": only(),
    "prediction": only(),
    "reasoning_effort": only(),
}
COMPLETION_NEUTRAL = {"echo": only(False), "best_of": only(1), "suffix": only("")}
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
    "ignore_eos",
    "min_tokens",
    "user",  # an end-user id for the caller's own records; checked, changes nothing
}
CHAT_FIELDS = SUPPORTED | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SUPPORTED | {"prompt"}
STREAM_OPTIONS = ("include_usage", "continuous_usage_stats")
TOKENIZE_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs"}  # a completion prompt
TOKENIZE_CHAT_FIELDS = {"model", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
DETOKENIZE_FIELDS = {"model", "tokens"}


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
    continuous_usage: bool = False  # usage on every chunk (vLLM: only with include_usage)


@dataclass
class Tokenize:
    """A validated /tokenize body: a completion prompt or chat messages, tokenized as those endpoints do."""

    model: str | None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


# ---- the body as a whole --------------------------------------------------------------------


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, with every string valid Unicode and no deeper than MAX_JSON_DEPTH."""
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
    except RecursionError:
        raise _too_deep() from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() digits
        raise bad_request(
            "the request body has an integer with thousands of digits; integers here are at most 2^63-1"
        ) from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    check_tree(body)
    return body


def check_tree(body: dict[str, Any]) -> None:
    """Every key and string valid Unicode, every container within MAX_JSON_DEPTH; iterative, so a
    deep body cannot exhaust the stack. The path of a bad string is built only when one is found."""
    stack: list[tuple[Any, tuple, int]] = [(body, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, path, key=True)
                if isinstance(v, (str, dict, list)):
                    stack.append((v, (*path, k), depth + 1))
        else:
            for i, v in enumerate(value):
                if isinstance(v, (str, dict, list)):
                    stack.append((v, (*path, i), depth + 1))


def _check_text(s: str, path: tuple, *, key: bool = False) -> None:
    """`s` (a string at `path`, or a key of the object at `path`) is valid Unicode."""
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        where = field_path(path)
        if key:
            what = f"the key {ascii(s)}" + (f" in '{where}'" if where else "")
        else:
            what = f"'{where}'"
        raise bad_request(
            f"{what} has a lone UTF-16 surrogate (\\u{ord(s[e.start]):04x}) at character {e.start}, which is "
            "not valid Unicode; send valid text (a surrogate escape must be one of a high-low pair)",
            param=where or None,
        ) from None


def field_path(path: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content' (OpenAI's way of naming nested fields)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _too_deep():
    return bad_request(
        f"the request body nests objects or lists more than {MAX_JSON_DEPTH} levels deep; "
        "no field of this API needs more than 5"
    )


# ---- completions -------------------------------------------------------------------------------


def parse_chat(body: dict[str, Any]) -> Parsed:
    _check_fields(body, CHAT_FIELDS, {**NEUTRAL, **CHAT_NEUTRAL})
    p = _common(body, chat=True)
    p.messages = _messages(body.get("messages"))
    a, b = body.get("max_tokens"), body.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    if b is not None:
        p.max_tokens, p.max_tokens_param = _int(b, "max_completion_tokens", low=1), "max_completion_tokens"
    return p


def parse_completion(body: dict[str, Any]) -> Parsed:
    _check_fields(body, COMPLETION_FIELDS, {**NEUTRAL, **COMPLETION_NEUTRAL})
    p = _common(body, chat=False)
    p.prompts = _prompts(body.get("prompt"))
    if p.stream and len(p.prompts) > 1:
        raise bad_request("stream=true takes one prompt per request; send the prompts separately", param="prompt")
    return p


def _check_fields(body: dict[str, Any], supported: set[str], neutral: dict[str, Neutral]) -> None:
    _no_unknown(body, supported | set(neutral))
    for k, n in neutral.items():
        if body.get(k) is not None and n.kind and not n.ok(body[k]):
            raise bad_request(f"'{k}' must be {n.kind} or null (it changes nothing here)", param=k)
    changing = sorted(k for k, n in neutral.items() if body.get(k) is not None and not n.ok(body[k]))
    if changing:
        shown = ", ".join(f"{k}={json.dumps(body[k])[:40]}" for k in changing)
        raise bad_request(
            f"unsupported parameter value(s) that would change the result: {shown}. This server generates one "
            "choice per request without penalties, logprobs, tools or response formats; remove them "
            "(or send their defaults)",
            param=changing[0],
        )


def _no_unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise bad_request(
            f"Unrecognized request argument(s) supplied: {', '.join(unknown)}; remove them", param=unknown[0]
        )


def _common(body: dict[str, Any], *, chat: bool) -> Parsed:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the model name from GET /v1/models", param="model")
    p = Parsed(model=model, chat=chat, stream=_bool(body, "stream"))
    p.include_usage, p.continuous_usage = _stream_options(body.get("stream_options"), p.stream)
    if body.get("max_tokens") is not None:
        p.max_tokens = _int(body["max_tokens"], "max_tokens", low=1)
    p.params = {
        "temperature": _num(_get(body, "temperature", DEFAULT_TEMPERATURE), "temperature", *TEMPERATURE_RANGE),
        "top_p": _num(_get(body, "top_p", TOP_P_RANGE[1]), "top_p", *TOP_P_RANGE, open_low=True),
        "top_k": max(0, _int(_get(body, "top_k", 0), "top_k", low=-1)),  # vLLM: -1 = off
        "seed": None if body.get("seed") is None else _int(body["seed"], "seed", low=0),
        "stop": _stop(body.get("stop")),
        "cache_salt": _opt_str(body.get("cache_salt"), "cache_salt", MAX_SALT_CHARS),
        "ignore_eos": _bool(body, "ignore_eos"),
        "min_tokens": _int(_get(body, "min_tokens", 0), "min_tokens", low=0),
    }
    _opt_str(body.get("user"), "user")
    return p


def _stream_options(opts: Any, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); as in vLLM, usage on every chunk needs both."""
    if opts is None:
        return False, False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    shape = '{"include_usage": true|false, "continuous_usage_stats": true|false}'
    if not isinstance(opts, dict) or set(opts) - set(STREAM_OPTIONS):
        raise bad_request(f"stream_options must be {shape}", param="stream_options")
    usage, continuous = (_bool(opts, k, f"stream_options.{k}") for k in STREAM_OPTIONS)
    return usage, usage and continuous


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _message(m: Any, where: str) -> dict[str, str]:
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad_request(
            f"{where}.role is {json.dumps(role)[:40]}; supported roles: {', '.join(ROLES)} (no tool messages)",
            param=f"{where}.role",
        )
    extra = sorted(set(m) - set(ASSISTANT_FIELDS if role == "assistant" else MESSAGE_FIELDS))
    if extra:
        raise bad_request(f"{where} has unsupported field(s) {extra} (tool calls are not supported)", param=where)
    for k in ("name", "refusal"):
        _opt_str(m.get(k), f"{where}.{k}")
    return {"role": ROLES[role], "content": _content(m.get("content"), where, role)}


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
                    param=f"{where}.content[{j}]",
                )
            parts.append(part["text"])
        return "\n".join(parts)
    raise bad_request(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _prompts(prompt: Any) -> list[str | list[int]]:
    hint = "'prompt' must be a string, a list of strings, a list of token ids, or a list of token id lists"
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [_ints(prompt)]
        if all(isinstance(s, str) for s in prompt):
            return list(prompt)
        if all(isinstance(s, list) and s and all(_is_int(t) for t in s) for s in prompt):
            return [_ints(s) for s in prompt]
    raise bad_request(hint, param="prompt")


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise bad_request(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad_request(
            f"a stop string has {longest:,} characters; each may have at most {MAX_STOP_CHARS:,}", param="stop"
        )
    return tuple(stop)


# ---- /tokenize and /detokenize (vLLM's shapes) ----------------------------------------------------


def parse_tokenize(body: dict[str, Any]) -> Tokenize:
    """`prompt` (tokenized as /v1/completions does) or `messages` (as /v1/chat/completions does)."""
    chat = body.get("messages") is not None
    if chat and body.get("prompt") is not None:
        raise bad_request("send either 'prompt' (a string) or 'messages' (chat messages), not both", param="prompt")
    _no_unknown(body, TOKENIZE_CHAT_FIELDS if chat else TOKENIZE_FIELDS)
    t = Tokenize(model=_opt_str(body.get("model"), "model"), return_token_strs=_bool(body, "return_token_strs"))
    if chat:
        t.messages = _messages(body["messages"])
        t.add_special_tokens = _bool(body, "add_special_tokens", default=False)
        t.add_generation_prompt = _bool(body, "add_generation_prompt", default=True)
        return t
    if not isinstance(body.get("prompt"), str):
        raise bad_request("'prompt' (a string) or 'messages' (chat messages) is required", param="prompt")
    t.prompt = body["prompt"]
    t.add_special_tokens = _bool(body, "add_special_tokens", default=True)
    return t


def parse_detokenize(body: dict[str, Any], vocab_size: int) -> tuple[str | None, list[int]]:
    """(model, token ids), each id in [0, vocab_size)."""
    _no_unknown(body, DETOKENIZE_FIELDS)
    model = _opt_str(body.get("model"), "model")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise bad_request("'tokens' must be a list of token ids (integers)", param="tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size}); send ids below {vocab_size}",
            param="tokens",
        )
    return model, _ints(tokens)


# ---- one value -----------------------------------------------------------------------------------


def _get(body: dict[str, Any], name: str, default: Any) -> Any:
    """The value of an optional field; null and absent both mean the default."""
    v = body.get(name)
    return default if v is None else v


def _bool(body: dict[str, Any], name: str, param: str | None = None, *, default: bool = False) -> bool:
    v = _get(body, name, default)
    if not isinstance(v, bool):
        raise bad_request(f"'{param or name}' must be true or false, got {json.dumps(v)[:40]}", param=param or name)
    return v


def _int(v: Any, name: str, *, low: int, high: int = INT64_MAX) -> int:
    if not _is_int(v) or not low <= v <= high:
        bound = f">= {low}" + (" and below 2^63" if high == INT64_MAX else f" and <= {high}")
        raise bad_request(f"'{name}' must be an integer {bound}, got {json.dumps(v)[:40]}", param=name)
    return int(v)


def _num(v: Any, name: str, low: float, high: float, *, open_low: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > high or v < low or (open_low and v == low):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise bad_request(f"'{name}' must be a number in {bounds}, got {json.dumps(v)[:40]}", param=name)
    return float(v)


def _opt_str(v: Any, name: str, max_chars: int | None = None) -> str | None:
    if v is not None and (not isinstance(v, str) or not v):
        raise bad_request(f"'{name}' must be a non-empty string or null", param=name)
    if v is not None and max_chars is not None and len(v) > max_chars:
        raise bad_request(f"'{name}' has {len(v):,} characters; at most {max_chars} are allowed", param=name)
    return v


def _is_int(x: Any) -> bool:
    """An integer as JSON Schema counts them: 4 and 4.0 (which clients write), never true."""
    if isinstance(x, float):
        return x.is_integer()
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(xs: list) -> list[int]:
    return [int(x) for x in xs]
