"""Pydantic models of the API's bodies, for `/openapi.json` and `/docs` (and schema-driven tools:
client generators, schemathesis).

They describe; `protocol.py` validates. The handlers read the raw body and check it there, so every
refusal stays a 400 in OpenAI's shape with a message that says what to change (FastAPI's own body
validation would answer 422 with pydantic's wording). Both read the same constants and tables from
`protocol.py` (bounds, the accepted no-op values of unsupported parameters, the field sets), and
tests/cluster/test_http_schema.py checks that the models have exactly protocol's fields and that
every real answer matches its response model.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model
from pydantic.json_schema import models_json_schema

from cluster.http import protocol as P
from cluster.http.responses import SSE_END
from worker.request import MAX_SALT_CHARS, MAX_STOP_STRINGS

DESCRIPTION = (
    "OpenAI-compatible API of a prefixcache service: a cluster-wide prefix (KV) cache in front of a "
    "Hugging Face model. usage.prompt_tokens_details.cached_tokens counts the prompt tokens the cache served. "
    "Errors are OpenAI's JSON; every message says what to change."
)
OPENAPI_URL, DOCS_URL = "/openapi.json", "/docs"
Finish = Literal["stop", "length"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests --------------------------------------------------------------------------------


class TextPart(_Body):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class SystemMessage(_Body):
    role: Literal["system", "developer"]  # developer is read as system
    content: Content
    name: str | None = Field(None, min_length=1)


class UserMessage(_Body):
    role: Literal["user"]
    content: Content
    name: str | None = Field(None, min_length=1)


class AssistantTurn(_Body):
    """An earlier answer in the conversation."""

    role: Literal["assistant"]
    content: Content | None = None
    name: str | None = Field(None, min_length=1)
    refusal: str | None = Field(None, min_length=1)


Message = Annotated[SystemMessage | UserMessage | AssistantTurn, Field(discriminator="role")]


class StreamOptions(_Body):
    include_usage: bool | None = Field(None, description="a last chunk with the usage of the whole request")
    continuous_usage_stats: bool | None = Field(
        None, description="vLLM's: usage so far on every chunk too (with include_usage)"
    )


Stop = Annotated[str, Field(min_length=1, max_length=P.MAX_STOP_CHARS)]


class _Sampling(_Body):
    model: str = Field(description="the model name from GET /v1/models")
    max_tokens: int | None = Field(
        None, ge=1, le=P.INT64_MAX, description="default: 512 for chats, 16 for completions, capped by the context"
    )
    temperature: float | None = Field(
        P.DEFAULT_TEMPERATURE, ge=P.TEMPERATURE_RANGE[0], le=P.TEMPERATURE_RANGE[1], description="0 is greedy"
    )
    top_p: float | None = Field(P.TOP_P_RANGE[1], gt=P.TOP_P_RANGE[0], le=P.TOP_P_RANGE[1])
    top_k: int | None = Field(0, ge=-1, le=P.INT64_MAX, description="vLLM's; 0 or -1 is off")
    seed: int | None = Field(None, ge=0, le=P.INT64_MAX, description="makes sampling repeatable")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SALT_CHARS,
        description="vLLM's: requests share cache only with the same salt",
    )
    ignore_eos: bool | None = Field(False, description="vLLM's: generate past end-of-sequence (fixed lengths)")
    min_tokens: int | None = Field(
        0, ge=0, le=P.INT64_MAX, description="vLLM's: no end of sequence or stop string before this many tokens"
    )
    user: str | None = Field(None, min_length=1, description="the caller's end-user id; changes nothing")


def _neutral_field(n: P.Neutral) -> Any:
    accepted = [n.schema] if n.schema else []  # `only()`: null alone
    schema = {"anyOf": [*accepted, {"type": "null"}], "description": "accepted only at values that change nothing"}
    return (Annotated[Any, WithJsonSchema(schema)], None)


def _request_model(name: str, base: type[BaseModel], neutral: dict[str, P.Neutral], doc: str) -> type[BaseModel]:
    fields = {k: _neutral_field(n) for k, n in neutral.items()}
    return create_model(name, __base__=base, __doc__=doc, **fields)


class _Chat(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=P.INT64_MAX, description="the same as max_tokens")


Text = Annotated[str, Field(min_length=1)]  # an empty prompt has no token to start from
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Completion(_Sampling):
    prompt: (
        Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="text, token ids, or a list of either (several prompts: not with stream)")


ChatCompletionRequest = _request_model(
    "ChatCompletionRequest", _Chat, {**P.NEUTRAL, **P.CHAT_NEUTRAL}, "POST /v1/chat/completions"
)
CompletionRequest = _request_model(
    "CompletionRequest", _Completion, {**P.NEUTRAL, **P.COMPLETION_NEUTRAL}, "POST /v1/completions"
)


class TokenizeCompletionRequest(_Body):
    """A completion prompt, tokenized as /v1/completions does."""

    model: str | None = Field(None, min_length=1)
    prompt: str
    add_special_tokens: bool | None = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Body):
    """Chat messages, rendered and tokenized as /v1/chat/completions does."""

    model: str | None = Field(None, min_length=1)
    messages: list[Message] = Field(min_length=1)
    add_special_tokens: bool | None = False
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    model: str | None = Field(None, min_length=1)
    tokens: list[Annotated[int, Field(ge=0)]]


REQUEST_MODELS = (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeCompletionRequest,
    TokenizeChatRequest,
    DetokenizeRequest,
)


# ---- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose prefill the cache skipped")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class _Head(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Finish


class ChatCompletion(_Head):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: Finish | None


class ChatCompletionChunk(_Head):
    """One `data:` event of a stream; the stream ends with `data: [DONE]`."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Finish | None


class Completion(_Head):
    """A whole answer, and (with finish_reason null until the last) each streamed chunk."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    workers_alive: int


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


class ResetResponse(BaseModel):
    blocks_dropped: int = Field(description="cached blocks dropped, all workers together")
    workers: dict[str, int] = Field(description="blocks dropped per worker")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


STREAMED_MODELS = (ChatCompletionChunk, Completion, ErrorBody)  # named by the SSE event schema


# ---- the OpenAPI document ----------------------------------------------------------------------


@functools.cache
def endpoints(app) -> tuple[tuple[str, str], ...]:
    """(METHOD, path) of every documented route of `app` (its routes are fixed once imported)."""
    paths = get_openapi(title="", version="", routes=app.routes)["paths"]
    return tuple(sorted((m.upper(), p) for p, ops in paths.items() for m in ops))


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its body is one of `models` (read by protocol.py, not by FastAPI)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    body = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}


def answers(model: type[BaseModel] | None = None, *, stream: type[BaseModel] | None = None) -> dict:
    """A route's `responses`: 200 with `model` (and SSE events of `stream` when streaming), errors as ErrorBody."""
    ok: dict[str, Any] = {"model": model} if model else {}
    if stream is not None:
        ok["content"] = {"text/event-stream": {"schema": sse_event(stream)}}
    return {200: ok, "default": {"model": ErrorBody, "description": "an error in OpenAI's shape"}}


def sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream: `data: [DONE]` last, before it JSON `chunk`s, or an error
    in OpenAI's shape when the answer fails after it started."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, ErrorBody)]
    payload = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}
    return {
        "type": "object",
        "required": ["data"],
        "description": chunk.__doc__,
        "if": {"properties": {"data": {"const": SSE_END}}},
        "then": {},
        "else": {"properties": {"data": payload}},
    }


def openapi(app, *, title: str, version: str, model: str, max_context: int, vocab_size: int) -> dict[str, Any]:
    """The document for `app`'s routes with the request models added, and what only the running
    service knows filled in: the model's name (the one value `model` may take), its context and
    its tokenizer's vocabulary (the ids /detokenize takes)."""
    spec = get_openapi(title=title, version=version, routes=app.routes, description=DESCRIPTION)
    _, defs = models_json_schema(
        [(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in STREAMED_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs["$defs"])
    served = {"type": "string", "enum": [model], "description": f"the served model, {model!r}"}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["model"] = served
    schemas["ModelCard"]["properties"]["max_model_len"]["description"] = f"{max_context} for {model!r}"
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"] = vocab_size - 1
    return spec
