"""ztai.gateway.connection: the bounded uvicorn protocol, driven through an in-memory transport."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Iterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from ztai.config import ServerSettings
from ztai.gateway import connection
from ztai.gateway.connection import BoundedHttpProtocol, ConnectionLimits

GET = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class App:
    """Answers 200 after reading the whole body; remembers what receive() gave it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            self.events.append(event)
            if event["type"] == "http.disconnect" or not event.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(autouse=True)
def default_limits() -> Iterator[None]:
    yield
    connection.use_limits(ServerSettings())


def open_connection(
    app: App | None = None, state: ServerState | None = None, **limits: Any
) -> tuple[BoundedHttpProtocol, MemoryTransport]:
    connection.use_limits(ServerSettings(**limits))
    config = Config(app=app or App(), lifespan="off", ws="none", log_level="critical")
    config.load()
    protocol = BoundedHttpProtocol(config=config, server_state=state or ServerState(), app_state={})
    transport = MemoryTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def status_of(transport: MemoryTransport) -> int:
    return int(bytes(transport.written[9:12]))


async def test_a_normal_request_is_served_and_leaves_no_timer() -> None:
    protocol, transport = open_connection()
    assert protocol._deadline is not None  # the first head has its deadline
    protocol.data_received(GET)
    await settle()
    assert status_of(transport) == 200
    assert protocol._deadline is None  # fast path: a request in one read arms nothing
    protocol.data_received(GET)  # keep-alive: the next request too
    await settle()
    assert transport.written.count(b"HTTP/1.1 200") == 2
    assert protocol._deadline is None and not transport.closed


async def test_a_complete_but_oversized_head_is_431() -> None:
    protocol, transport = open_connection(max_header_bytes=1024)
    protocol.data_received(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    await settle()
    assert status_of(transport) == 431 and transport.closed


async def test_a_long_url_counts_toward_the_head() -> None:
    protocol, transport = open_connection(max_header_bytes=1024)
    protocol.data_received(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(transport) == 431 and transport.closed


async def test_an_unterminated_head_is_cut_off_in_small_reads() -> None:
    protocol, transport = open_connection(max_header_bytes=1024)
    protocol.data_received(b"GET /x HTTP/1.1\r\nX-Big: ")
    reads = 0
    while not transport.closed:
        protocol.data_received(b"a" * 100)
        reads += 1
    assert status_of(transport) == 431
    assert reads <= 11  # refused as soon as the bytes pass the limit


async def test_too_many_fields_are_400() -> None:
    protocol, transport = open_connection(max_headers=8)
    protocol.data_received(b"GET /x HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(9)) + b"\r\n")
    assert status_of(transport) == 400
    assert transport.written.endswith(b"Too many request header fields")


async def test_exactly_the_limits_are_served() -> None:
    fields = b"Host: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(7))
    protocol, transport = open_connection(max_headers=8)
    protocol.data_received(b"GET /x HTTP/1.1\r\n" + fields + b"\r\n")
    await settle()
    assert status_of(transport) == 200


async def test_a_malformed_request_is_still_uvicorns_400() -> None:
    protocol, transport = open_connection()
    protocol.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(transport) == 400 and transport.closed


async def test_a_head_not_finished_in_time_is_408() -> None:
    protocol, transport = open_connection(header_timeout_seconds=0.1)
    protocol.data_received(b"GET /x HTTP/1.1\r\nHost")
    await asyncio.sleep(0.05)
    protocol.data_received(b": x\r\n")  # progress does not extend the deadline
    await asyncio.sleep(0.1)
    assert status_of(transport) == 408 and transport.closed


async def test_a_silent_connection_is_closed_after_the_header_timeout() -> None:
    _protocol, transport = open_connection(header_timeout_seconds=0.1)
    await asyncio.sleep(0.15)
    assert status_of(transport) == 408 and transport.closed


async def test_a_body_not_finished_in_time_is_408_and_the_app_sees_a_disconnect() -> None:
    app = App()
    protocol, transport = open_connection(app, body_timeout_seconds=0.1)
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    await settle()
    assert protocol._phase == "body"
    await asyncio.sleep(0.15)
    await settle()
    assert status_of(transport) == 408 and transport.closed
    assert app.events[-1]["type"] == "http.disconnect"
    assert transport.written.count(b"HTTP/1.1") == 1  # the app's late answer is dropped


async def test_a_body_in_time_is_served() -> None:
    protocol, transport = open_connection(body_timeout_seconds=0.5)
    protocol.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    await asyncio.sleep(0.05)
    protocol.data_received(b"67890")
    await settle()
    assert status_of(transport) == 200 and protocol._deadline is None


async def test_connections_over_the_cap_are_503() -> None:
    state = ServerState()
    first, first_transport = open_connection(state=state, max_connections=2)
    open_connection(state=state, max_connections=2)
    third, third_transport = open_connection(state=state, max_connections=2)
    assert status_of(third_transport) == 503 and third_transport.closed
    assert not first_transport.closed
    third.connection_lost(None)  # what the event loop does once a transport is closed
    first.connection_lost(None)
    _fourth, fourth_transport = open_connection(state=state, max_connections=2)
    assert not fourth_transport.closed


def test_limits_follow_the_settings_within_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ServerSettings(max_connections=5000, header_timeout_seconds=3, max_headers=50)
    limits = ConnectionLimits.from_settings(server)
    assert (limits.header_timeout, limits.max_headers) == (3, 50)
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 4096))
    assert ConnectionLimits.from_settings(server).max_connections == 1024 - 64


def test_serve_options_use_the_bounded_protocol() -> None:
    options = connection.uvicorn_options(ServerSettings(keep_alive_timeout_seconds=7))
    assert options == {"http": connection.PROTOCOL, "ws": "none", "timeout_keep_alive": 7}


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ServerSettings(header_timeout_seconds=0)
