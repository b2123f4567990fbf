"""Response bodies in OpenAI's shapes, for whole responses and for SSE chunks.

`usage.prompt_tokens_details.cached_tokens` is OpenAI's own field for prompt caching: here it is
the number of prompt tokens whose prefill the cache skipped, so clients see the cache work.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from worker.request import Result

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # Result.finish_reason -> OpenAI's
SSE_END = "[DONE]"  # the data of a stream's last event
SSE_DONE = f"data: {SSE_END}\n\n".encode()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OMIT = object()  # a chunk without a usage field


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def counts(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage(results: list[Result]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {**counts(prompt, completion), "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(result: Result) -> str:
    return FINISH.get(result.finish_reason, "stop")


class Responder:
    """Builds the bodies of one request: the same id, creation time, model and fingerprint throughout."""

    def __init__(self, chat: bool, model: str, fingerprint: str):
        self.chat, self.model = chat, model
        self.id = new_id(chat)
        self.created = int(time.time())
        self.system_fingerprint = f"prefixcache-{fingerprint[:16]}"

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }

    def whole(self, results: list[Result]) -> dict[str, Any]:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": None,
                    "finish_reason": finish_reason(r),
                }
                for i, r in enumerate(results)
            ]
        else:
            choices = [
                {"index": i, "text": r.text, "logprobs": None, "finish_reason": finish_reason(r)}
                for i, r in enumerate(results)
            ]
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": choices,
            "usage": usage(results),
        }

    def chunk(self, text: str | None, finish: str | None = None, *, first: bool = False, usage: Any = OMIT) -> bytes:
        """One SSE event with a piece of text (or the final finish_reason); `usage` is the chunk's
        usage field: null (include_usage: OpenAI sends null on every chunk but the last), the usage
        so far (continuous_usage_stats), or OMIT."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {**self._head(self._chunk_object()), "choices": [choice]}
        if usage is not OMIT:
            body["usage"] = usage
        return sse(body)

    def usage_chunk(self, result: Result) -> bytes:
        return sse({**self._head(self._chunk_object()), "choices": [], "usage": usage([result])})

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
