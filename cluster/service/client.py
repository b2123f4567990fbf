"""Cluster: the Python face of the service.

    c = Cluster.start(workers=2, model="demo")          # local Ray + embedded Redis
    c = Cluster.connect("ray://head:10001")             # a service started with `prefixcache start`
    [r] = c.generate(["..."], max_new_tokens=32)
    c.stats(); c.redis_url; c.shutdown()

`shutdown()` undoes what this client did: after `start()` it stops the
service (and the local Ray it started); after `connect()` it only
disconnects. `stop_service()` stops a service from any client.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import ray

from cluster.http.server import start_http
from cluster.service.launch import add_workers, start_service, stop_service
from cluster.service.lookup import find_router, find_routers
from cluster.service.raylink import init_ray
from cluster.service.spec import ServiceSpec, router_for
from worker.names import NAMESPACE
from worker.request import Chunk, Request, Result, stop_tuple


class Cluster:
    def __init__(self, router, *, service: str, owns_service: bool, owns_ray: bool, actors=None):
        self._router = router  # replica 0: stats, config
        self._actors = actors  # keeps non-detached actors alive while this client lives
        self.service = service
        self._owns_service = owns_service
        self._owns_ray = owns_ray
        self._config = ray.get(router.config.remote())
        self._routers = find_routers(service, self._config["spec"]["routers"])
        self.http_url: str | None = None  # the OpenAI-compatible API, when start() was given http_port

    # ---- construction -----------------------------------------------------------

    @classmethod
    def start(
        cls,
        workers: int = 2,
        model: str = "demo",
        *,
        redis_url: str | None = None,
        address: str | None = None,
        num_cpus: int | None = None,
        http_port: int | None = None,
        http_host: str | None = None,
        api_keys: str | None = None,
        **settings,
    ) -> Cluster:
        """Start a service: on a local Ray (started here if none is running) or at `address`.

        `settings` are ServiceSpec fields: routers, device_cache_gb, host_cache_gb, block_size, policy,
        eviction, service, dtype, cpus_per_worker, gpus_per_worker, detached, ...
        With `http_port`, the OpenAI-compatible HTTP API serves it too (`c.http_url`); `api_keys` is a
        file of 'KEY TENANT' lines (without one the API binds 127.0.0.1 only).
        """
        spec = ServiceSpec(workers=workers, model=model, redis_url=redis_url, **settings)
        owns_ray = not ray.is_initialized()
        if owns_ray:
            if address is None:
                cpus = num_cpus or max(os.cpu_count() or 2, int(workers * spec.cpus_per_worker) + 1)
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
            else:
                init_ray(address, namespace=NAMESPACE, log_to_driver=False)
        try:
            started = start_service(spec)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        c = cls(started.router, service=spec.service, owns_service=True, owns_ray=owns_ray, actors=started)
        if http_port is not None:
            try:
                c.http_url = start_http(spec.service, http_port, host=http_host, api_keys=api_keys)
            except BaseException:
                c.shutdown()
                raise
        return c

    @classmethod
    def connect(cls, address: str = "auto", *, service: str = ServiceSpec.service) -> Cluster:
        """Attach to a running service (`ray://host:10001` through Ray client, or `auto` inside the cluster)."""
        owns_ray = not ray.is_initialized()
        if owns_ray:
            init_ray(address, namespace=NAMESPACE, log_to_driver=False)
        try:
            router = find_router(service)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        return cls(router, service=service, owns_service=False, owns_ray=owns_ray)

    # ---- requests -----------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]] | str,
        max_new_tokens: int = Request.max_new_tokens,
        temperature: float = Request.temperature,
        top_p: float = Request.top_p,
        top_k: int = Request.top_k,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        cache_salt: str | None = None,
        *,
        tenant: str | None = None,
        ignore_eos: bool = Request.ignore_eos,
        min_tokens: int = Request.min_tokens,
    ) -> list[Result]:
        """One Result per prompt, in order; a bad prompt gets a Result with `error` set."""
        if isinstance(prompts, str):
            prompts = [prompts]
        stops = stop_tuple(stop)
        extra = {"ignore_eos": ignore_eos, "min_tokens": min_tokens}
        reqs = [
            Request(p, max_new_tokens, temperature, top_p, top_k, seed, stops, cache_salt, **extra) for p in prompts
        ]
        return self.run(reqs, tenant=tenant)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = Request.max_new_tokens,
        temperature: float = Request.temperature,
        top_p: float = Request.top_p,
        top_k: int = Request.top_k,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        cache_salt: str | None = None,
        *,
        tenant: str | None = None,
        ignore_eos: bool = Request.ignore_eos,
        min_tokens: int = Request.min_tokens,
    ) -> Iterator[Chunk]:
        """Chunks of text (with their token ids) as the worker generates them; the last chunk carries
        the Result (`chunk.result`). Closing the iterator early cancels the request."""
        stops = stop_tuple(stop)
        extra = {"ignore_eos": ignore_eos, "min_tokens": min_tokens}
        req = Request(prompt, max_new_tokens, temperature, top_p, top_k, seed, stops, cache_salt, **extra)
        gen = self._router_for(req, tenant).stream.options(num_returns="streaming").remote(req.to_dict(), tenant)
        finished = False
        try:
            for ref in gen:
                chunk = Chunk.from_dict(ray.get(ref))
                finished = chunk.result is not None
                yield chunk
                if finished:
                    return
        finally:
            if not finished:
                ray.cancel(gen)

    def run(self, requests: Sequence[Request], *, tenant: str | None = None) -> list[Result]:
        refs = [self._router_for(r, tenant).generate.remote(r.to_dict(), tenant) for r in requests]
        return [Result.from_dict(d) for d in ray.get(refs)]

    def submit(
        self, requests: Iterable[Request], *, tenant: str | None = None, window: int = 256
    ) -> Iterator[tuple[int, Result]]:
        """Stream (position, Result) as requests finish, keeping at most `window` in flight."""
        pending: dict = {}
        it = enumerate(requests)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < window:
                try:
                    i, req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[self._router_for(req, tenant).generate.remote(req.to_dict(), tenant)] = i
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), Result.from_dict(ray.get(ref))

    def _router_for(self, req: Request, tenant: str | None):
        return router_for(self._routers, req.prompt, tenant, req.cache_salt, self._config["block_size"])

    def warm(
        self,
        prompts: Sequence[str | Sequence[int] | Request] | str,
        *,
        cache_salt: str | None = None,
        tenant: str | None = None,
        everywhere: bool = False,
    ) -> list[dict]:
        """Pre-warm before traffic arrives: compute and pin each prompt's prefix on the worker its
        requests will be placed on (every worker with `everywhere`). A pin lasts for the worker's
        life; with a disk tier the pinned blocks are written to disk first, so a restarted worker
        still has them (cached, no longer pinned). One dict per prompt: {"workers": {worker id:
        tokens pinned}} or {"error": what to change}. A Request stands for its prompt and salt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        reqs = [
            Request(p.prompt, 0, cache_salt=p.cache_salt)
            if isinstance(p, Request)
            else Request(p, 0, cache_salt=cache_salt)
            for p in prompts
        ]
        reqs = [r.to_dict() for r in reqs]
        return ray.get(self._router.warm.remote(reqs, tenant, everywhere))

    # ---- operations -----------------------------------------------------------------

    def stats(self) -> dict:
        return ray.get(self._router.stats.remote())

    @property
    def redis_url(self) -> str:
        """The metadata store in use, credentials included (e.g. for `prefixcache dashboard`)."""
        return self._config["redis_url"]

    @property
    def config(self) -> dict:
        """The service's settings as of connecting (cached)."""
        return dict(self._config)

    def config_now(self) -> dict:
        """The service's settings and live workers, asked of the router now."""
        self._config = ray.get(self._router.config.remote())
        return dict(self._config)

    def set_policy(self, name: str) -> None:
        ray.get([r.set_policy.remote(name) for r in self._routers])

    def add_workers(self, n: int) -> list[str]:
        handles = add_workers(self.service, n)
        if self._actors is not None:
            self._actors.workers.update(handles)
        return list(handles)

    def stop_service(self) -> None:
        stop_service(self.service)
        self._owns_service = False

    def shutdown(self) -> None:
        if self._owns_service:
            self.stop_service()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
