"""Server-Sent Events: the gateway's one decoder (WHATWG event stream format) and encoder.

Every streamed path (OpenAI chat streams, MCP answers) reads its upstream through `SseDecoder`, which is
correct for any chunking: lines end in LF, CRLF or CR (a CRLF split across two chunks is one line end),
`data:` lines of one event are joined with LF, comments are dropped, `event`/`id`/`retry` are kept. It is
bounded: an event larger than `max_event_bytes` (including a line that never ends) is refused with
`UpstreamResponseTooLarge` before it is buffered whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from ztai.errors import UpstreamResponseTooLarge

DEFAULT_MAX_EVENT_BYTES = 1_048_576


@dataclass(frozen=True)
class SseEvent:
    """One dispatched event (each keeps exactly the fields it carried, so relaying it changes nothing)."""

    data: str
    event: str = ""
    id: str | None = None
    retry: int | None = None


class SseDecoder:
    """An incremental SSE parser: `feed` bytes as they arrive, get the events they complete."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._partial: list[bytes] = []  # the start of a line whose end has not arrived
        self._partial_bytes = 0
        self._after_cr = False  # the last byte seen was a CR: a LF right after it ends nothing new
        self._event_bytes = 0  # bytes of the event being read so far (its complete lines)
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events completed by `chunk` (raises UpstreamResponseTooLarge for an oversize event)."""
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the second half of a CRLF split across chunks
        if not chunk:
            return []
        self._after_cr = chunk.endswith(b"\r")
        if b"\n" not in chunk and b"\r" not in chunk:  # no line ends yet: no copying of what is held
            self._partial.append(chunk)
            self._partial_bytes += len(chunk)
            self._check_size(self._partial_bytes)
            return []
        self._partial.append(chunk)
        data = b"".join(self._partial)
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        rest = lines.pop()
        self._partial, self._partial_bytes = ([rest] if rest else []), len(rest)
        events: list[SseEvent] = []
        for raw in lines:
            self._event_bytes += len(raw) + 1
            self._check_size(0)
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        self._check_size(self._partial_bytes)
        return events

    def close(self) -> list[SseEvent]:
        """The end of the stream: a last line or event the server did not terminate."""
        events = self.feed(b"\n\n") if self._partial or self._data or self._retry is not None else []
        self._after_cr = False
        return events

    def _check_size(self, pending: int) -> None:
        if self._event_bytes + pending > self._max_event_bytes:
            raise UpstreamResponseTooLarge(
                f"upstream sent a stream event larger than {self._max_event_bytes} bytes",
                code="upstream_event_too_large",
            )

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        self._event_bytes = 0
        if not self._data and self._retry is None:
            self._event, self._id = "", None
            return None
        event = SseEvent("\n".join(self._data), self._event, self._id, self._retry)
        self._data, self._event, self._id, self._retry = [], "", None, None
        return event


def encode_sse(event: SseEvent) -> bytes:
    """One event in the wire format (multi-line data split over `data:` lines, LF line ends)."""
    lines: list[str] = []
    if event.event:
        lines.append(f"event: {event.event}")
    if event.id is not None:
        lines.append(f"id: {event.id}")
    if event.retry is not None:
        lines.append(f"retry: {event.retry}")
    if event.data or not lines:
        lines.extend(f"data: {line}" for line in event.data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()
