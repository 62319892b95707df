"""Streamed chat answers: an OpenAI SSE stream re-emitted with every text the model writes filtered.

The stream is read with the gateway's one SSE decoder (any line ending, any chunking, bounded events).
Each choice's content and refusal, and each tool call's arguments, has its own `StreamFilter` (its own
hold-back window), keyed by (choice index, text): what a filter releases goes out under its own choice
and tool-call index, so choices of `n` > 1 never mix. Fields ztai does not inspect are dropped. An event
that is not a chat chunk is refused (UpstreamResponseInvalid), never passed on.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from ztai.gateway.content import TEXT_FIELDS, StreamFilter, only_inspected, unreadable
from ztai.gateway.sse import SseDecoder, SseEvent, encode_sse

MAX_STREAM_PARTS = 256  # (choice, tool call) pairs one stream may fill; more is not a real answer


async def filter_sse(
    chunks: AsyncIterator[bytes],
    stream: StreamFilter,
    before_release: Callable[[], Awaitable[None]],
    max_event_bytes: int = 1_048_576,
) -> AsyncGenerator[bytes, None]:
    """Re-emit an OpenAI chat SSE stream with every text the model writes passed through a filter of its
    own (forked from `stream`): each choice's content and refusal, each tool call's arguments; what is
    released stays under its own choice and tool-call index. Raises UpstreamResponseInvalid for an event
    that is not a chat chunk, UpstreamResponseTooLarge for one over `max_event_bytes`.

    `before_release` runs before each event goes out (it makes pending audit records durable)."""
    decoder = SseDecoder(max_event_bytes)
    rewriter = _StreamRewriter(stream)
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            async for out in rewriter.event(event):
                await before_release()
                yield out
    for event in decoder.close():
        async for out in rewriter.event(event):
            await before_release()
            yield out
    async for out in rewriter.rest():
        await before_release()
        yield out


_Part = tuple[int, int | str]  # (choice index, tool call index or a text field's name)


class _StreamRewriter:
    """The state of one filtered stream: a StreamFilter per (choice, text), and the first chunk's fields
    (id, model, ...) for the events it adds."""

    def __init__(self, stream: StreamFilter) -> None:
        self._stream = stream
        self._filters: dict[_Part, StreamFilter] = {}
        self._template: dict[str, Any] = {}

    async def event(self, event: SseEvent) -> AsyncIterator[bytes]:
        if event.data.strip() == "[DONE]":
            async for out in self.rest():
                yield out
            yield encode_sse(event)
            return
        if not event.data.strip():
            yield encode_sse(event)  # an id / retry only event
            return
        document = _chunk_json(event.data)
        choices = document.get("choices")
        if not choices:
            yield encode_sse(event)  # a usage chunk, or a provider's error event: no model text
            return
        self._template = self._template or {k: v for k, v in document.items() if k != "choices"}
        kept = [choice for choice in choices if await self._filtered_choice(choice)]
        if kept or document.get("usage"):
            document["choices"] = kept
            yield encode_sse(SseEvent(orjson.dumps(document).decode(), event.event, event.id, event.retry))

    async def rest(self) -> AsyncIterator[bytes]:
        """What is still held at the end of the stream, released per choice."""
        for index in sorted({choice for choice, _ in self._filters}):
            choice: dict[str, Any] = {"index": index, "delta": {}, "finish_reason": None}
            if await self._flush_choice(index, choice["delta"]):
                document = {**self._template, "choices": [choice]}
                document.setdefault("object", "chat.completion.chunk")
                yield encode_sse(SseEvent(orjson.dumps(document).decode()))
        self._filters.clear()

    async def _filtered_choice(self, choice: Any) -> bool:
        """Filter one choice's delta in place; False when nothing of it is left to send now."""
        if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
            raise unreadable("a stream choice is not an object with an integer index")
        index: int = choice.get("index", 0)
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice["delta"] = {}
        only_inspected(delta)
        choice.pop("message", None)  # a chunk carries deltas; a whole message here would go unread
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None  # its tokens spell out the unfiltered text
        for key in TEXT_FIELDS:
            if isinstance(delta.get(key), str):
                delta[key] = await self._filter((index, key), delta[key], in_json=False)
        calls = delta.get("tool_calls")
        for position, call in enumerate(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                number = call.get("index", position)
                part: _Part = (index, number if isinstance(number, int) else position)
                function["arguments"] = await self._filter(part, function["arguments"], in_json=True)
        legacy = delta.get("function_call")
        if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
            legacy["arguments"] = await self._filter(
                (index, "function_call"), legacy["arguments"], in_json=True
            )
        if choice.get("finish_reason") is not None:
            await self._flush_choice(index, delta)
            return True
        return not _is_empty(choice)

    async def _filter(self, part: _Part, text: str, *, in_json: bool) -> str:
        stream = self._filters.get(part)
        if stream is None:
            if len(self._filters) >= MAX_STREAM_PARTS:
                raise unreadable(f"the stream fills more than {MAX_STREAM_PARTS} choices and tool calls")
            stream = self._filters[part] = self._stream.fork(in_json=in_json)
        return await stream.feed(text)

    async def _flush_choice(self, index: int, delta: dict[str, Any]) -> bool:
        """Append what the choice's filters still hold to `delta`; True when anything was added."""
        added = False
        for part in [p for p in self._filters if p[0] == index]:
            rest = await self._filters.pop(part).flush()
            if not rest:
                continue
            added = True
            field_name = part[1]
            if field_name in TEXT_FIELDS:
                assert isinstance(field_name, str)
                delta[field_name] = str(delta.get(field_name) or "") + rest
            elif field_name == "function_call":
                legacy = delta.setdefault("function_call", {})
                legacy["arguments"] = str(legacy.get("arguments") or "") + rest
            else:
                _tool_call(delta, int(field_name))["arguments"] += rest
        return added


def _tool_call(delta: dict[str, Any], number: int) -> dict[str, Any]:
    """The `function` of tool call `number` in `delta` (added when the delta has none)."""
    calls = delta.get("tool_calls")
    if not isinstance(calls, list):
        calls = delta["tool_calls"] = []
    call = next((c for p, c in enumerate(calls) if isinstance(c, dict) and c.get("index", p) == number), None)
    if call is None:
        call = {"index": number}
        calls.append(call)
    function = call.get("function")
    if not isinstance(function, dict):
        function = call["function"] = {}
    function["arguments"] = str(function.get("arguments") or "")
    return function


def _is_empty(choice: dict[str, Any]) -> bool:
    """Whether filtering left nothing of a choice to send now (all its text held back)."""
    delta: dict[str, Any] = choice["delta"]
    if set(choice) - {"index", "delta", "finish_reason", "logprobs"}:
        return False
    for key, value in delta.items():
        if key in TEXT_FIELDS and value == "":
            continue
        if key == "tool_calls" and isinstance(value, list) and all(_held_piece(c) for c in value):
            continue
        if key == "function_call" and value == {"arguments": ""}:
            continue
        return False
    return True


def _held_piece(call: Any) -> bool:
    """A tool-call piece that only carried arguments, all held back."""
    return (
        isinstance(call, dict)
        and set(call) <= {"index", "function"}
        and call.get("function") == {"arguments": ""}
    )


def _chunk_json(data: str) -> dict[str, Any]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise unreadable("a stream event is not JSON") from None
    if not isinstance(document, dict):
        raise unreadable("a stream event is not a JSON object")
    if "choices" in document and not isinstance(document["choices"], list):
        raise unreadable("a stream event's 'choices' is not a list")
    return document
