"""The FastAPI routes and the Ray Serve deployment that serves them (the documented Serve pattern:
`@serve.deployment` + `@serve.ingress(app)`; `ray.serve.llm` needs vLLM, which this service replaces).

Replicas are stateless: each holds the router's handle, the tokenizer (to render chats and count
prompt tokens, so a context overflow is a 400 with the numbers before any worker is involved) and the
key digests. Handlers only await: tokenizing runs in a thread, Ray calls are awaited object refs.
Handlers read the raw body and validate it in protocol.py; schema.py's models describe the bodies
for /openapi.json. Middleware, outermost first: CORS (when --allowed-origins is set), request
metrics, and a catch-all that turns any escaped exception into a JSON 500.
(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at runtime.
`serve.ingress` pickles the app when the class is defined: helpers live in other modules, not below,
and everything the app needs is added to it above the class. The class travels to its replicas by
value, with copies of the objects its methods name: a per-process object such as the request
metrics is reached through its module, `http_metrics.REQUESTS`, never imported by name.)
"""

import asyncio
import time
from typing import Any

import ray
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from cluster.http import chat, cors, schema
from cluster.http import metrics as http_metrics  # a module: its REQUESTS is the process's one
from cluster.http.errors import (
    APIError,
    CatchAll,
    ErrorResponse,
    bad_request,
    context_exceeded,
    from_result,
    from_validation,
    model_not_found,
    response,
    too_large,
)
from cluster.http.errors import unavailable as unavailable_error
from cluster.http.keys import tenant_for
from cluster.http.protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_BODY_BYTES,
    Parsed,
    Tokenize,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json,
    parse_tokenize,
)
from cluster.http.responses import SSE_HEADERS, Responder
from cluster.http.stream import RouterStream, Usage, sse_events
from cluster.release import PREFIXCACHE_VERSION
from cluster.service.lookup import find_router, find_routers
from cluster.service.spec import router_for
from worker.request import NO_TOKENS, Request, Result, fits_context

MAX_ONGOING_REQUESTS = 256  # per replica; Serve's default (5) would queue a chat burst at the proxy
ROUTER_TIMEOUT_S = 5.0
RESET_TIMEOUT_S = 120.0  # the router gives each worker 60 s
TITLE = "prefixcache"

app = FastAPI(title=TITLE, docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(CatchAll)  # innermost of the three: the others see its 500
app.add_middleware(http_metrics.Counting)
app.add_middleware(cors.CORS)


@app.exception_handler(APIError)
async def _api_error(_request, e: APIError) -> JSONResponse:
    return response(e)


@app.exception_handler(RequestValidationError)
async def _validation_error(_request, e: RequestValidationError) -> JSONResponse:
    return response(from_validation(e))


@app.exception_handler(HTTPException)
async def _http_error(request, e: HTTPException) -> JSONResponse:
    """Unknown routes and methods, in the same JSON shape as every other error."""
    routes = ", ".join(f"{m} {p}" for m, p in schema.endpoints(request.app))
    msg = f"{request.method} {request.url.path}: {e.detail}; the API has {routes} (GET /docs describes them)"
    return ErrorResponse(APIError(e.status_code, msg).body(), status_code=e.status_code)


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
    def __init__(self, service: str, key_digests: dict[str, str] | None = None, allowed_origins: tuple = ()):
        self.keys = key_digests
        cors.configure(allowed_origins)
        router = find_router(service)
        cfg = ray.get(router.config.remote())  # constructor: not on an event loop
        self.routers = find_routers(service, cfg["spec"]["routers"])
        self.block_size = int(cfg["block_size"])
        self.model = cfg["spec"]["model"]
        self.fingerprint = cfg["fingerprint"]
        self.max_context = int(cfg["max_context"])
        from worker.models import load_tokenizer  # transformers (and with it torch): at start, not on import

        self.tokenizer = load_tokenizer(self.model)
        self.cluster_metrics = http_metrics.ClusterMetrics(cfg["redis_url"], service)
        self.created = int(time.time())
        self._openapi: dict | None = None

    # ---- operations: open to load balancers and browsers --------------------------------------

    @app.get("/health", responses=schema.answers(schema.Health))
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

    @app.get("/version", responses=schema.answers(schema.Version))
    async def version(self) -> JSONResponse:
        return JSONResponse({"version": PREFIXCACHE_VERSION})

    @app.get(schema.OPENAPI_URL, include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        if self._openapi is None:
            self._openapi = schema.openapi(
                app,
                title=TITLE,
                version=PREFIXCACHE_VERSION,
                model=self.model,
                max_context=self.max_context,
                vocab_size=len(self.tokenizer),
            )
        return JSONResponse(self._openapi)

    @app.get(schema.DOCS_URL, include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=schema.OPENAPI_URL, title=f"{TITLE} API")

    # ---- keyed ------------------------------------------------------------------------------

    @app.get(
        "/metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
    )
    async def metrics(self, request: HTTPRequest) -> Response:
        """Prometheus text: this replica's request metrics, then the cluster's cache metrics."""
        tenant_for(self.keys, request.headers.get("authorization"))
        cluster = await asyncio.to_thread(self.cluster_metrics.render)
        return Response(http_metrics.REQUESTS.render() + cluster, media_type=http_metrics.CONTENT_TYPE)

    @app.get("/v1/models", responses=schema.answers(schema.ModelList))
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

    @app.post(
        "/v1/chat/completions",
        openapi_extra=schema.request_body(schema.ChatCompletionRequest),
        responses=schema.answers(schema.ChatCompletion, stream=schema.ChatCompletionChunk),
    )
    async def chat_completions(self, request: HTTPRequest):
        return await self._complete(request, chat=True)

    @app.post(
        "/v1/completions",
        openapi_extra=schema.request_body(schema.CompletionRequest),
        responses=schema.answers(schema.Completion, stream=schema.Completion),
    )
    async def completions(self, request: HTTPRequest):
        return await self._complete(request, chat=False)

    @app.post(
        "/tokenize",
        openapi_extra=schema.request_body(schema.TokenizeCompletionRequest, schema.TokenizeChatRequest),
        responses=schema.answers(schema.TokenizeResponse),
    )
    async def tokenize(self, request: HTTPRequest) -> JSONResponse:
        """vLLM's /tokenize: the prompt ids the completion endpoints would run."""
        tenant_for(self.keys, request.headers.get("authorization"))
        t = parse_tokenize(parse_json(await read_body(request)))
        self._check_model(t.model)
        ids = await asyncio.to_thread(self._tokenize_one, t)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if t.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": self.max_context, "tokens": ids, "token_strs": strs})

    @app.post(
        "/detokenize",
        openapi_extra=schema.request_body(schema.DetokenizeRequest),
        responses=schema.answers(schema.DetokenizeResponse),
    )
    async def detokenize(self, request: HTTPRequest) -> JSONResponse:
        tenant_for(self.keys, request.headers.get("authorization"))
        model, ids = parse_detokenize(parse_json(await read_body(request)), len(self.tokenizer))
        self._check_model(model)
        return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, ids)})

    @app.post("/reset_prefix_cache", responses=schema.answers(schema.ResetResponse))
    async def reset_prefix_cache(self, request: HTTPRequest) -> JSONResponse:
        """Empty every worker's prefix cache (benchmarks that must start cold); blocks that requests
        in flight use stay, so their answers do not change. Any key of --api-keys may call it."""
        tenant_for(self.keys, request.headers.get("authorization"))
        out = await self._reset()
        if out["failed"]:
            why = ", ".join(f"{w}: {e}" for w, e in sorted(out["failed"].items()))
            raise unavailable_error(f"these workers did not empty their caches ({why}); the others did; retry")
        dropped = out["workers"]
        return JSONResponse({"blocks_dropped": sum(dropped.values()), "workers": dropped})

    # ---- generation ---------------------------------------------------------------------------

    async def _complete(self, request: HTTPRequest, *, chat: bool):
        arrived = time.perf_counter()
        endpoint = request.url.path
        tenant = tenant_for(self.keys, request.headers.get("authorization"))
        body = parse_json(await read_body(request))
        parsed = parse_chat(body) if chat else parse_completion(body)
        self._check_model(parsed.model)
        responder = Responder(chat, self.model, self.fingerprint)
        prompts = await asyncio.to_thread(self._tokenize, parsed)
        reqs = [self._request(parsed, ids, responder.id) for ids in prompts]
        if parsed.stream:
            return await self._stream(reqs[0], tenant, parsed, responder, endpoint, arrived)
        results = await asyncio.gather(*(self._generate(r, tenant) for r in reqs))
        for r in results:
            http_metrics.REQUESTS.generated(endpoint, r, arrived, None)
        return JSONResponse(responder.whole(results))

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise model_not_found(name, self.model)

    def _tokenize(self, parsed: Parsed) -> list[list[int]]:
        if parsed.chat:
            return [chat.chat_ids(self.tokenizer, parsed.messages)]
        return [chat.text_ids(self.tokenizer, p) if isinstance(p, str) else p for p in parsed.prompts]

    def _tokenize_one(self, t: Tokenize) -> list[int]:
        if t.messages is not None:
            return chat.chat_ids(
                self.tokenizer,
                t.messages,
                add_generation_prompt=t.add_generation_prompt,
                add_special_tokens=t.add_special_tokens,
            )
        return chat.text_ids(self.tokenizer, t.prompt, add_special_tokens=t.add_special_tokens)

    def _request(self, parsed: Parsed, ids: list[int], request_id: str) -> dict[str, Any]:
        """The router's Request for one prompt; context and parameter problems are 400s here."""
        if not ids:
            raise bad_request(NO_TOKENS, param="prompt")
        room = self.max_context - len(ids)
        min_tokens = parsed.params["min_tokens"]
        default = DEFAULT_CHAT_MAX_TOKENS if parsed.chat else DEFAULT_COMPLETION_MAX_TOKENS
        max_tokens = parsed.max_tokens if parsed.max_tokens is not None else min(max(default, min_tokens), room)
        if max_tokens < 1 or not fits_context(len(ids), max_tokens, self.max_context):
            prompt_param = "messages" if parsed.chat else "prompt"
            raise context_exceeded(
                len(ids), max(max_tokens, 1), self.max_context, parsed.max_tokens_param, prompt_param
            )
        if min_tokens > max_tokens:
            given = "" if parsed.max_tokens is not None else " (what fits in the context)"
            raise bad_request(
                f"min_tokens={min_tokens} is more than {parsed.max_tokens_param}={max_tokens}{given}; "
                f"lower min_tokens or raise {parsed.max_tokens_param}",
                param="min_tokens",
            )
        req = Request(prompt=ids, max_new_tokens=max_tokens, id=request_id, **parsed.params)
        problem = req.problem()
        if problem:
            raise bad_request(problem)
        return req.to_dict()

    def _router_for(self, req: dict[str, Any], tenant: str | None):
        return router_for(self.routers, req["prompt"], tenant, req.get("cache_salt"), self.block_size)

    async def _generate(self, req: dict[str, Any], tenant: str | None) -> Result:
        ref = self._router_for(req, tenant).generate.remote(req, tenant)
        try:
            out = Result.from_dict(await ref)
        except asyncio.CancelledError:  # the client went away
            ray.cancel(ref)
            raise
        except ray.exceptions.RayActorError as e:
            raise unavailable_error(f"the router is not running ({type(e).__name__}); retry shortly") from None
        if not out.ok:
            raise from_result(out)
        return out

    async def _stream(
        self, req: dict[str, Any], tenant: str | None, parsed: Parsed, responder: Responder, endpoint: str, arrived
    ):
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
        if first.result is not None and not first.result.ok:
            raise from_result(first.result)
        first_at = None if first.result is not None else time.perf_counter()
        usage = Usage(parsed.include_usage, parsed.continuous_usage, prompt_tokens=len(req["prompt"]))
        events = sse_events(
            stream,
            first,
            usage,
            responder,
            lambda result: http_metrics.REQUESTS.generated(endpoint, result, arrived, first_at),
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _reset(self) -> dict:
        """The first router replica that answers fans the reset out to every worker."""
        last: Exception | None = None
        for r in self.routers:
            try:
                return await asyncio.wait_for(r.reset_prefix_cache.remote(), RESET_TIMEOUT_S)
            except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
                last = e
        raise unavailable_error(f"no router replica answers ({type(last).__name__}); retry shortly")
