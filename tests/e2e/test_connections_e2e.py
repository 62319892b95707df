"""End to end: hostile clients against a real `ztai serve` (ztai.gateway.connection). Oversized heads are
answered 431, too many header fields 400, and both connections closed; a head or a body that does not
arrive in time is answered 408 and closed; meanwhile normal requests are answered at once."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Gateway, start_gateway

pytestmark = pytest.mark.e2e
TIMEOUT = 2.0  # header and body timeout of this test's server
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 20
# Timing slack for a loaded CI machine; without the limits these connections stay open past SOCKET_TIMEOUT.
SLACK = 4.0
SOCKET_TIMEOUT = 15.0
FAST = 1.5  # a normal request meanwhile (milliseconds when idle; bench/hostile_clients.py measures it)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        "ZTAI_SERVER__HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
        "ZTAI_SERVER__BODY_TIMEOUT_SECONDS": str(TIMEOUT),
        "ZTAI_SERVER__MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        "ZTAI_SERVER__MAX_HEADERS": str(MAX_HEADERS),
        "ZTAI_SERVER__KEEP_ALIVE_TIMEOUT_SECONDS": "1",
    }
    instance = start_gateway(tmp_path_factory.mktemp("bounded"), extra_env=env)
    yield instance
    instance.close()


def connect(gateway: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=SOCKET_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(sock: socket.socket, data: bytes) -> bool:
    """Send what the server still takes; False once it has closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def assert_fast_healthz(gateway: Gateway) -> None:
    started = time.monotonic()
    response = httpx.get(f"{gateway.root_url}/healthz", timeout=5)
    assert response.status_code == 200
    assert time.monotonic() - started < FAST


def test_an_oversized_header_is_431_and_closed(bounded: Gateway) -> None:
    with connect(bounded) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n\r\n"
        send(sock, head)
        answer = read_until_closed(sock)
    assert status_of(answer) == 431
    assert b"connection: close" in answer


def test_an_unterminated_header_is_cut_off_at_the_limit(bounded: Gateway) -> None:
    with connect(bounded) as sock:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, open_ = 0, True
        while open_ and sent < 10 * 1_048_576:
            open_ = send(sock, b"a" * 4096)
            sent += 4096
        answer = read_until_closed(sock)
    assert status_of(answer) == 431
    assert sent < 10 * 1_048_576  # the server stopped reading long before 10 MB


def test_a_head_just_under_the_limit_is_served(bounded: Gateway) -> None:
    value = "a" * (MAX_HEADER_BYTES - 200)
    response = httpx.get(f"{bounded.root_url}/healthz", headers={"x-pad": value}, timeout=5)
    assert response.status_code == 200


def test_too_many_header_fields_are_400_and_closed(bounded: Gateway) -> None:
    with connect(bounded) as sock:
        fields = b"".join(b"X-F%d: v\r\n" % index for index in range(MAX_HEADERS + 5))
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        answer = read_until_closed(sock)
    assert status_of(answer) == 400
    assert b"Too many request header fields" in answer


def test_slowloris_connections_are_closed_after_the_header_timeout(bounded: Gateway) -> None:
    socks = [connect(bounded) for _ in range(50)]
    try:
        started = time.monotonic()
        for sock in socks[:25]:  # half send part of a head, half send nothing at all
            send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        for _ in range(3):
            assert_fast_healthz(bounded)  # the server still answers others at once
            time.sleep(0.2)
        answers = [read_until_closed(sock) for sock in socks]
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + SLACK
    assert {status_of(answer) for answer in answers} == {408}


def test_a_dripping_head_is_closed_after_the_header_timeout(bounded: Gateway) -> None:
    with connect(bounded) as sock:
        started = time.monotonic()
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while send(sock, b"X-A: b\r\n") and time.monotonic() - started < SOCKET_TIMEOUT:
            time.sleep(0.3)  # a header field every 0.3 s never finishes the head
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + SLACK
    assert status_of(answer) == 408


def test_a_slow_body_is_408_and_closed(bounded: Gateway) -> None:
    token = bounded.token()
    with connect(bounded) as sock:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        send(sock, head + b'{"model": "mock", ')
        while send(sock, b" ") and time.monotonic() - started < SOCKET_TIMEOUT:
            time.sleep(0.3)  # a byte every 0.3 s: the body keeps coming, too slowly
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + SLACK
    assert status_of(answer) == 408
    assert_fast_healthz(bounded)


def test_keep_alive_requests_and_pipelining_still_work(bounded: Gateway) -> None:
    with httpx.Client(timeout=5) as client:
        for _ in range(5):
            assert client.get(f"{bounded.root_url}/healthz").status_code == 200
    with connect(bounded) as sock:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        send(sock, request * 2 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == 3


def test_an_idle_keep_alive_connection_is_closed(bounded: Gateway) -> None:
    with connect(bounded) as sock:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200")
    assert 0.5 < elapsed < 1 + SLACK  # keep-alive timeout 1 s


def test_blank_lines_between_requests_do_not_keep_a_connection_open(bounded: Gateway) -> None:
    with connect(bounded) as sock:
        send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        while send(sock, b"\r\n") and time.monotonic() - started < SOCKET_TIMEOUT:
            time.sleep(0.3)  # blank lines before a next request that never comes
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200")
    assert elapsed < TIMEOUT + SLACK


def test_every_worker_gets_the_limits(tmp_path: Path) -> None:
    env = {"ZTAI_SERVER__HEADER_TIMEOUT_SECONDS": "1", "ZTAI_SERVER__MAX_HEADER_BYTES": "2048"}
    gateway = start_gateway(tmp_path, extra_env=env, serve_args=("--workers", "2"))
    try:
        for _ in range(4):  # connections spread over both workers
            with connect(gateway) as sock:
                started = time.monotonic()
                send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                answer = read_until_closed(sock)
                assert status_of(answer) == 408 and time.monotonic() - started < 1 + SLACK
            with connect(gateway) as sock:
                send(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
                assert status_of(read_until_closed(sock)) == 431
    finally:
        gateway.close()
