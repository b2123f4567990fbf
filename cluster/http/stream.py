"""The one place the HTTP layer talks to `RouterService.stream` (a Ray streaming generator).

Items are `{"text": str, "token_ids": [...]}` pieces, and last `{"result": <Result dict>}`.
Cancelling the generator cancels the request on its worker, which frees its KV blocks.
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.http.errors import from_result
from cluster.http.responses import SSE_DONE, Responder, finish_reason, sse


class RouterStream:
    def __init__(self, router, request: dict[str, Any], tenant: str | None):
        self._gen = router.stream.options(num_returns="streaming").remote(request, tenant)
        self.done = False

    async def next(self) -> dict[str, Any]:
        """The next item; a stream that ends without its result is reported as a failed request."""
        try:
            ref = await self._gen.__anext__()
        except StopAsyncIteration:
            self.done = True
            return {"result": {"error": "internal error on the router: the stream ended without a result"}}
        item = await ref
        if "result" in item:
            self.done = True
        return item

    def cancel(self) -> None:
        """Idempotent; a no-op once the result has arrived."""
        if not self.done:
            self.done = True
            ray.cancel(self._gen)


async def sse_events(stream: RouterStream, item: dict[str, Any], chat: bool, usage: bool, responder: Responder):
    """SSE chunks in OpenAI's shape, ending with `data: [DONE]`. Leaving early (a client that
    disconnects cancels this generator) cancels the request on its worker and frees its blocks."""
    try:
        if chat:
            yield responder.chunk(None, first=True, with_usage=usage)
        while True:
            if "result" in item:
                result = item["result"]
                if result.get("error"):  # after text was sent: the status line is gone, say it in the stream
                    yield sse(from_result(result).body())
                else:
                    yield responder.chunk(None, finish_reason(result), with_usage=usage)
                    if usage:
                        yield responder.usage_chunk(result)
                break
            if item["text"]:
                yield responder.chunk(item["text"], with_usage=usage)
            item = await stream.next()
        yield SSE_DONE
    finally:
        stream.cancel()
