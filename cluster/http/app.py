"""The FastAPI routes and the Ray Serve deployment that serves them (the documented Serve pattern:
`@serve.deployment` + `@serve.ingress(app)`; `ray.serve.llm` needs vLLM, which this service replaces).

Replicas are stateless: each holds the router's handle, the tokenizer (to render chats and count
prompt tokens, so a context overflow is a 400 with the numbers before any worker is involved) and the
key digests. Handlers only await: tokenizing runs in a thread, Ray calls are awaited object refs.
(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at runtime.
`serve.ingress` pickles the app when the class is defined: helpers live in other modules, not below.)
"""

import asyncio
import time
from typing import Any

import ray
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from cluster.http import chat
from cluster.http.errors import APIError, bad_request, context_exceeded, from_result, model_not_found, too_large
from cluster.http.errors import unavailable as unavailable_error
from cluster.http.keys import tenant_for
from cluster.http.protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_BODY_BYTES,
    Parsed,
    parse_chat,
    parse_completion,
    parse_json,
)
from cluster.http.responses import SSE_HEADERS, Responder
from cluster.http.stream import RouterStream, sse_events
from cluster.service import find_router, find_routers, router_for
from worker.models import load_tokenizer
from worker.request import Request

MAX_ONGOING_REQUESTS = 256  # per replica; Serve's default (5) would queue a chat burst at the proxy
ROUTER_TIMEOUT_S = 5.0

app = FastAPI(title="prefixcache", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(_request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(HTTPException)
async def _http_error(request, e: HTTPException) -> JSONResponse:
    """Unknown routes and methods, in the same JSON shape as every other error."""
    msg = f"{request.method} {request.url.path}: {e.detail}; the API has /v1/chat/completions, /v1/completions, "
    return JSONResponse(APIError(e.status_code, msg + "/v1/models, /health").body(), status_code=e.status_code)


async def read_body(request: HTTPRequest) -> bytes:
    """The body, refusing more than MAX_BODY_BYTES without reading it all (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large(int(declared), MAX_BODY_BYTES)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large(size, MAX_BODY_BYTES)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class Ingress:
    def __init__(self, service: str, key_digests: dict[str, str] | None = None):
        self.keys = key_digests
        router = find_router(service)
        cfg = ray.get(router.config.remote())  # constructor: not on an event loop
        self.routers = find_routers(service, cfg["spec"]["routers"])
        self.block_size = int(cfg["block_size"])
        self.model = cfg["spec"]["model"]
        self.fingerprint = cfg["fingerprint"]
        self.max_context = int(cfg["max_context"])
        self.tokenizer = load_tokenizer(self.model)
        self.created = int(time.time())

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when every router replica answers and a worker is alive, else 503 (for load balancers)."""
        try:
            cfgs = await asyncio.wait_for(asyncio.gather(*(r.config.remote() for r in self.routers)), ROUTER_TIMEOUT_S)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            raise unavailable_error(f"a router does not answer ({type(e).__name__})") from None
        cfg = cfgs[0]
        if not cfg["alive"]:
            raise unavailable_error(f"no live worker (workers: {cfg['workers']})")
        return JSONResponse({"status": "ok", "model": self.model, "workers_alive": len(cfg["alive"])})

    @app.get("/v1/models")
    async def models(self, request: HTTPRequest) -> JSONResponse:
        tenant_for(self.keys, request.headers.get("authorization"))
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "prefixcache",
            "max_model_len": self.max_context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: HTTPRequest):
        return await self._complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: HTTPRequest):
        return await self._complete(request, chat=False)

    async def _complete(self, request: HTTPRequest, *, chat: bool):
        tenant = tenant_for(self.keys, request.headers.get("authorization"))
        body = parse_json(await read_body(request))
        parsed = parse_chat(body) if chat else parse_completion(body)
        if parsed.model != self.model:
            raise model_not_found(parsed.model, self.model)
        responder = Responder(chat, self.model, self.fingerprint)
        prompts = await asyncio.to_thread(self._tokenize, parsed)
        reqs = [self._request(parsed, ids, responder.id) for ids in prompts]
        if parsed.stream:
            return await self._stream(reqs[0], tenant, parsed, responder)
        results = await asyncio.gather(*(self._generate(r, tenant) for r in reqs))
        return JSONResponse(responder.whole(results))

    def _tokenize(self, parsed: Parsed) -> list[list[int]]:
        if parsed.chat:
            return [chat.chat_ids(self.tokenizer, parsed.messages)]
        return [chat.text_ids(self.tokenizer, p) if isinstance(p, str) else p for p in parsed.prompts]

    def _request(self, parsed: Parsed, ids: list[int], request_id: str) -> dict[str, Any]:
        """The router's Request for one prompt; context and parameter problems are 400s here."""
        if not ids:
            raise bad_request("the prompt tokenizes to no tokens; send some text", param="prompt")
        room = self.max_context - len(ids)
        default = DEFAULT_CHAT_MAX_TOKENS if parsed.chat else DEFAULT_COMPLETION_MAX_TOKENS
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else min(default, room)
        if max_tokens < 1 or len(ids) + max_tokens > self.max_context:
            prompt_param = "messages" if parsed.chat else "prompt"
            raise context_exceeded(
                len(ids), max(max_tokens, 1), self.max_context, parsed.max_tokens_param, prompt_param
            )
        req = Request(prompt=ids, max_new_tokens=max_tokens, id=request_id, **parsed.params)
        problem = req.problem()
        if problem:
            raise bad_request(problem)
        return req.to_dict()

    def _router_for(self, req: dict[str, Any], tenant: str | None):
        return router_for(self.routers, req["prompt"], tenant, req.get("cache_salt"), self.block_size)

    async def _generate(self, req: dict[str, Any], tenant: str | None) -> dict[str, Any]:
        ref = self._router_for(req, tenant).generate.remote(req, tenant)
        try:
            out = await ref
        except asyncio.CancelledError:  # the client went away
            ray.cancel(ref)
            raise
        except ray.exceptions.RayActorError as e:
            raise unavailable_error(f"the router is not running ({type(e).__name__}); retry shortly") from None
        if out.get("error"):
            raise from_result(out)
        return out

    async def _stream(self, req: dict[str, Any], tenant: str | None, parsed: Parsed, responder: Responder):
        """An SSE response; a request the router refuses before its first token is a plain HTTP error."""
        stream = RouterStream(self._router_for(req, tenant), req, tenant)
        try:
            first = await stream.next()
        except ray.exceptions.RayActorError as e:
            stream.cancel()
            raise unavailable_error(f"the router is not running ({type(e).__name__}); retry shortly") from None
        except BaseException:
            stream.cancel()
            raise
        if "result" in first and first["result"].get("error"):
            raise from_result(first["result"])
        events = sse_events(stream, first, parsed.chat, parsed.include_usage, responder)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
