"""A built-in OpenAI-compatible mock provider for demos, tests and benchmarks.

Replies are canned and deterministic. Streaming sends one SSE chunk per word. A message containing
`[[mock:error]]` gets a 500, `[[mock:sleep:MS]]` waits MS milliseconds first (to exercise timeouts),
`[[mock:leak-system]]` answers with the system prompt (to exercise prompt-leak detection),
`[[mock:rate-limit]]` gets a 429 with `retry-after` (and `[[mock:rate-limit-plain]]` one with a body
that is not OpenAI's error shape). Every answer carries `x-ratelimit-*` headers, and one internal header
(`x-mock-internal`) that must not reach clients.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ztai.gateway.responses import JSONResponse, error_body

_SLEEP = re.compile(r"\[\[mock:sleep:(\d{1,6})\]\]")
EMBEDDING_DIMENSIONS = 8
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "1000",
    "x-ratelimit-remaining-requests": "999",
    "x-ratelimit-reset-requests": "7s",
    "x-mock-internal": "not for clients",
}


def _last_user_text(messages: Any) -> str:
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def reply_text(prompt: str) -> str:
    words = prompt.split()
    preview = " ".join(words[:12])
    return f"This is a mock reply to: {preview}" if preview else "This is a mock reply."


async def chat_completions(request: Request) -> Response:
    payload = orjson.loads(await request.body())
    prompt = _last_user_text(payload.get("messages"))
    if "[[mock:error]]" in prompt:
        return JSONResponse(error_body("mock failure", "server_error", "mock_error"), status_code=500)
    if "[[mock:rate-limit" in prompt:
        headers = {**RATE_LIMIT_HEADERS, "retry-after": "7", "x-ratelimit-remaining-requests": "0"}
        if "[[mock:rate-limit-plain]]" in prompt:
            return Response(b"slow down", status_code=429, headers=headers, media_type="text/plain")
        body = error_body("mock rate limit", "requests", "rate_limit_exceeded")
        return JSONResponse(body, status_code=429, headers=headers)
    sleep = _SLEEP.search(prompt)
    if sleep:
        await asyncio.sleep(int(sleep.group(1)) / 1000)
    model = str(payload.get("model", "mock"))
    text = reply_text(prompt)
    if "[[mock:leak-system]]" in prompt:  # plays a model tricked into revealing its system prompt
        text = " ".join(
            str(m.get("content", ""))
            for m in payload.get("messages", [])
            if isinstance(m, dict) and m.get("role") == "system"
        )
    created = int(time.time())
    completion_id = f"chatcmpl-mock{created}"
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if payload.get("stream"):
        options = payload.get("stream_options")
        counted = usage if isinstance(options, dict) and options.get("include_usage") else None
        return StreamingResponse(
            _stream(completion_id, created, model, text, counted),
            media_type="text/event-stream",
            headers=RATE_LIMIT_HEADERS,
        )
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage,
        },
        headers=RATE_LIMIT_HEADERS,
    )


async def _stream(
    completion_id: str, created: int, model: str, text: str, usage: dict[str, int] | None = None
) -> AsyncIterator[bytes]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        return event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])

    yield chunk({"role": "assistant", "content": ""}, None)
    words = text.split(" ")
    for index, word in enumerate(words):
        yield chunk({"content": word if index == 0 else " " + word}, None)
        await asyncio.sleep(0)
    yield chunk({}, "stop")
    if usage is not None:  # as OpenAI sends it with stream_options.include_usage: no choices
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


async def embeddings(request: Request) -> Response:
    payload = orjson.loads(await request.body())
    inputs = payload.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, item in enumerate(items):
        seed = sum(str(item).encode()) or 1
        vector = [((seed * (i + 7)) % 1000) / 1000 for i in range(EMBEDDING_DIMENSIONS)]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": payload.get("model", "mock"),
            "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
        }
    )


async def models(_request: Request) -> Response:
    return JSONResponse(
        {"object": "list", "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "ztai-mock"}]}
    )


def create_mock_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
