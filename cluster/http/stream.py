"""The one place the HTTP layer talks to `RouterService.stream` (a Ray streaming generator).

Its items are `Chunk` dicts, read with `Chunk.from_dict`: pieces of text with their token ids, and
last a chunk that carries the Result. Cancelling the generator cancels the request on its worker,
which frees its KV blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from cluster.http.errors import from_result, internal, unavailable
from cluster.http.responses import OMIT, SSE_DONE, Responder, counts, finish_reason, sse
from worker.request import Chunk, ErrorKind, Result

log = logging.getLogger(__name__)
ENDED_EARLY = "internal error on the router: the stream ended without a result"


class RouterStream:
    def __init__(self, router, request: dict[str, Any], tenant: str | None):
        self._gen = router.stream.options(num_returns="streaming").remote(request, tenant)
        self.done = False

    async def next(self) -> Chunk:
        """The next chunk; a stream that ends without its result is reported as a failed request."""
        try:
            ref = await self._gen.__anext__()
        except StopAsyncIteration:
            self.done = True
            return Chunk("", (), Result.failed(ENDED_EARLY, ErrorKind.INTERNAL))
        chunk = Chunk.from_dict(await ref)
        if chunk.result is not None:
            self.done = True
        return chunk

    def cancel(self) -> None:
        """Idempotent; a no-op once the result has arrived."""
        if not self.done:
            self.done = True
            ray.cancel(self._gen)


@dataclass
class Usage:
    """What the stream's chunks say about usage: nothing, null until the last chunk (include_usage),
    or the counts so far on every chunk (continuous_usage_stats)."""

    include: bool
    continuous: bool
    prompt_tokens: int
    generated: int = 0

    def field(self) -> Any:
        if self.continuous:
            return counts(self.prompt_tokens, self.generated)
        return None if self.include else OMIT


async def sse_events(
    stream: RouterStream,
    chunk: Chunk,
    usage: Usage,
    responder: Responder,
    finished: Callable[[Result], None],
):
    """SSE chunks in OpenAI's shape from the stream's chunks (`chunk`: the first, already read),
    ending with `data: [DONE]`; `finished` gets the Result.
    Leaving early (a client that disconnects cancels this generator) cancels the request on its
    worker and frees its blocks. Once text was sent the status line is gone: a failure after that
    is an error event in the stream, in OpenAI's error shape."""
    try:
        if responder.chat:
            yield responder.chunk(None, first=True, usage=usage.field())
        while chunk.result is None:
            usage.generated += len(chunk.token_ids)
            if chunk.text:
                yield responder.chunk(chunk.text, usage=usage.field())
            chunk = await stream.next()
        result = chunk.result
        if not result.ok:
            yield sse(from_result(result).body())
        else:
            finished(result)
            yield responder.chunk(None, finish_reason(result), usage=usage.field())
            if usage.include:
                yield responder.usage_chunk(result)
        yield SSE_DONE
    except ray.exceptions.RayActorError as e:
        yield sse(unavailable(f"the router stopped mid-answer ({type(e).__name__}); resend the request").body())
        yield SSE_DONE
    except Exception as e:
        log.exception("streaming an answer failed")
        yield sse(internal(f"internal error while streaming ({type(e).__name__}); resend the request").body())
        yield SSE_DONE
    finally:
        stream.cancel()
