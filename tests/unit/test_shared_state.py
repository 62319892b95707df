"""ztai.store.shared: a Redis outage is one typed error (SharedStateUnavailable, 503) from every store that
uses Redis, raised within the client's timeouts; the protocols map it to their 503 errors."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tests.conftest import redis_url_or_skip
from ztai.agents.provenance import Observed
from ztai.agents.session import RedisSessionStore
from ztai.errors import SharedStateUnavailable, StoreError
from ztai.gateway.mcp_messages import INTERNAL_ERROR, problem_of
from ztai.store import shared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_client() -> aioredis.Redis:
    """A client of a port where nothing listens (connection refused), with the short timeouts."""
    return shared.async_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)


def test_the_error_is_a_store_error_answered_503() -> None:
    error = SharedStateUnavailable("cannot read the session: Redis unavailable (ConnectionError)")
    assert isinstance(error, StoreError) and error.status == 503
    assert error.code == "shared_state_unavailable" and error.type == "server_error"
    problem = problem_of(error)
    assert problem.rpc_code == INTERNAL_ERROR and problem.status == 503 and "Redis" in problem.message


async def test_every_redis_session_store_call_fails_closed_and_fast() -> None:
    store = RedisSessionStore(dead_client(), ttl_seconds=60)
    observed = Observed(values={b"k"}, suspicious=set(), max_probability=0.0)
    calls = {
        "record the session": store.record("t", "s", observed, trusted=False, source="x", flagged=False),
        "read the session": store.lookup("t", "s", {b"k"}),
        "count the call": store.spend_call("t", [("task", 3)]),
    }
    for what, call in calls.items():
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable) as raised:
            await call
        assert raised.value.message.startswith(f"cannot {what}: Redis unavailable")
        assert time.monotonic() - started < 3
    await store.close()


async def test_ping_names_redis_when_it_is_down_and_passes_when_up() -> None:
    client = dead_client()
    with pytest.raises(SharedStateUnavailable, match="cannot reach Redis"):
        await shared.ping(client)
    await client.aclose()
    live = shared.async_client(redis_url_or_skip())
    await shared.ping(live)
    await live.aclose()


async def test_an_error_reply_is_refused_too_and_other_errors_pass_through() -> None:
    @shared.shared_state("run the script")
    async def failing(error: Exception) -> None:
        raise error

    with pytest.raises(SharedStateUnavailable, match="ResponseError"):
        await failing(ResponseError("NOSCRIPT"))
    with pytest.raises(ValueError):
        await failing(ValueError("a bug, not an outage"))


async def test_a_redis_that_accepts_but_never_answers_times_out_into_the_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads until the client gives up; never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = shared.async_client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SharedStateUnavailable, match="cannot count the call"):
        await RedisSessionStore(client, ttl_seconds=60).spend_call("t", [("task", 3)])
    assert time.monotonic() - started < 3
    await client.aclose()
    server.close()
