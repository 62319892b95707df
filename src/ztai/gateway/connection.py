"""Bounded HTTP/1.1 connections: uvicorn's httptools protocol with limits on what one client may hold.

uvicorn bounds neither the request head (httptools buffers an unterminated header line without limit)
nor the time a client may take to send it. `BoundedHttpProtocol` adds, per connection:

- the head (request line and header fields) at most `server.max_header_bytes`: more is answered 431;
  more than `server.max_headers` fields: 400; both close the connection before the app sees anything;
- the head complete within `server.header_timeout_seconds` of the connection or of its first byte,
  and the body complete within `server.body_timeout_seconds` of the head: else 408 and closed;
- at most `server.max_connections` open connections per worker: one more is answered 503 and closed.

Idle keep-alive connections are uvicorn's own `timeout_keep_alive` (`server.keep_alive_timeout_seconds`).
The fast path stays uvicorn's: a request that arrives in one read arms no timer of its own.
"""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from typing import Any, Literal

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ztai.config import ServerSettings

PROTOCOL = "ztai.gateway.connection:BoundedHttpProtocol"
_FD_RESERVE = 64  # descriptors kept for the database, upstream clients and logs
_Phase = Literal["head", "body"] | None


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ConnectionLimits:
        return cls(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            header_timeout=server.header_timeout_seconds,
            body_timeout=server.body_timeout_seconds,
            max_connections=min(server.max_connections, descriptor_budget()),
        )


def descriptor_budget() -> int:
    """How many connections the process's open-file limit leaves room for."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - _FD_RESERVE) if soft != resource.RLIM_INFINITY else 1 << 30


_limits = ConnectionLimits.from_settings(ServerSettings())


def use_limits(server: ServerSettings) -> ConnectionLimits:
    """Set the limits every connection of this process gets (uvicorn builds the protocol itself)."""
    global _limits
    _limits = ConnectionLimits.from_settings(server)
    return _limits


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """The uvicorn settings that bound connections; also sets this process's limits."""
    use_limits(server)
    return {"http": PROTOCOL, "ws": "none", "timeout_keep_alive": server.keep_alive_timeout_seconds}


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the status goes out instead of uvicorn's 400."""


class BoundedHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = _limits
        self._in_head = True  # waiting for or reading a request head (not yet complete)
        self._head_bytes = 0  # bytes received while in the head: bounds an unterminated head
        self._head_size = 0  # request line + fields parsed so far: bounds a head that completes in one read
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: _Phase = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._send_error(503, "Too many connections")
            return
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            self._set_deadline(None)
            return
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._send_error(431, "Request header fields too large")
            return
        self._rearm()

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refuse(400, "Too many request header fields")
        self._count_head(len(name) + len(value) + 4)  # ': ' and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            self._refuse(431, "Request header fields too large")

    def _refuse(self, status: int, reason: str) -> None:
        self._refusal = (status, reason)
        raise _Refused(reason)  # httptools stops; uvicorn answers through send_400_response

    def send_400_response(self, msg: str) -> None:
        status, reason = self._refusal or (400, msg)
        self._send_error(status, reason)

    def _send_error(self, status: int, reason: str) -> None:
        """Answer `status` with `reason` as text and close (uvicorn's own 400, for any status)."""
        self._set_deadline(None)
        body = reason.encode("ascii")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        if not self.transport.is_closing():
            self.transport.write(b"".join(content))
            self.transport.close()

    # Deadlines: one timer per connection, for the phase the client has to finish
    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _rearm(self) -> None:
        phase: _Phase = "body" if not self._in_head else None if self._busy() else "head"
        if phase != self._phase:
            self._set_deadline(phase)

    def _set_deadline(self, phase: _Phase) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            delay = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
            self._deadline = self.loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        """The client did not finish its head or body in time: 408 unless an answer has begun; close."""
        phase, self._deadline, self._phase = self._phase, None, None
        cycle = self.cycle if phase == "body" else None
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() sees http.disconnect; its answer is dropped
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._send_error(408, "Request timeout")


__all__ = ["PROTOCOL", "BoundedHttpProtocol", "ConnectionLimits", "use_limits", "uvicorn_options"]
