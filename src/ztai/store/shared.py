"""Shared fast state in Redis (`store.redis_url`): client construction and one pub/sub channel.

Redis carries what several replicas must learn within milliseconds (revocations) and what they share
per request (agent sessions). It is never the only copy of anything durable: a message lost while a
replica was disconnected is still found by that replica's next poll of the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ztai.errors import SharedStateUnavailable

log = logging.getLogger("ztai.store")

CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 2.0
_RECONNECT_FIRST = 0.1
_RECONNECT_MAX = 5.0
_POLL_SECONDS = 1.0  # how long one read on the subscription waits before the loop checks its health

P = ParamSpec("P")
R = TypeVar("R")


AsyncFunction = Callable[P, Coroutine[Any, Any, R]]


def shared_state(what: str) -> Callable[[AsyncFunction[P, R]], AsyncFunction[P, R]]:
    """Decorate an async method that uses Redis: a Redis failure (connection refused or lost, timeout,
    an error reply) becomes SharedStateUnavailable naming `what` (503), never a raw driver error.
    The client reconnects by itself, so the first call after Redis is back succeeds."""

    def decorate(function: AsyncFunction[P, R]) -> AsyncFunction[P, R]:
        @functools.wraps(function)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await function(*args, **kwargs)
            except (RedisError, OSError) as exc:
                raise SharedStateUnavailable(
                    f"cannot {what}: Redis unavailable ({type(exc).__name__})"
                ) from exc

        return guarded

    return decorate


@shared_state("reach Redis")
async def ping(client: aioredis.Redis) -> None:
    """Raise SharedStateUnavailable unless Redis answers a PING within the client's timeouts."""
    await client.ping()


def async_client(url: str, timeout: float = COMMAND_TIMEOUT) -> aioredis.Redis:
    """A pooled asyncio client for `url` with short connect and command timeouts (`timeout` seconds):
    a stalled Redis must not stall requests."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        socket_keepalive=True,
        health_check_interval=10,
    )


def publish_once(url: str, channel: str, message: bytes) -> bool:
    """Publish one message with a short-lived blocking client (for the CLI). False when Redis failed."""
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT)
    try:
        client.publish(channel, message)
        return True
    except (RedisError, OSError) as exc:
        log.warning("cannot publish to Redis channel %s: %s", channel, type(exc).__name__)
        return False
    finally:
        client.close()


class PubSubChannel:
    """One Redis pub/sub channel: publish from any thread, listen with reconnection.

    `listen()` runs until cancelled: it subscribes, hands every message to `handle`, and on any failure
    waits (exponential backoff up to a few seconds) and subscribes again. `subscribed` is set while a
    subscription is live, cleared while it is not.
    """

    def __init__(self, url: str, channel: str, *, max_message_bytes: int = 4096) -> None:
        self.url = url
        self.channel = channel
        self.max_message_bytes = max_message_bytes
        self.subscribed = asyncio.Event()
        self._client: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task[bool]] = set()

    def _publisher(self) -> aioredis.Redis:
        if self._client is None:
            self._client = async_client(self.url)
            self._loop = asyncio.get_running_loop()
        return self._client

    async def publish(self, message: bytes) -> bool:
        """Publish `message`; False (logged) when Redis is unreachable. Never raises for Redis failures."""
        try:
            await self._publisher().publish(self.channel, message)
            return True
        except (RedisError, OSError) as exc:
            log.warning("cannot publish to Redis channel %s: %s", self.channel, type(exc).__name__)
            return False

    def publish_threadsafe(self, message: bytes) -> None:
        """Schedule a publish on the channel's event loop from any thread (fire and forget)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("Redis channel %s is not started; message not published", self.channel)
            return
        loop.call_soon_threadsafe(self._spawn, message)

    def _spawn(self, message: bytes) -> None:
        task = asyncio.ensure_future(self.publish(message))
        self._pending.add(task)  # keep a reference until done (the loop only holds weak ones)
        task.add_done_callback(self._pending.discard)

    def start(self) -> None:
        """Bind the channel to the running event loop (so `publish_threadsafe` works before a publish)."""
        self._publisher()

    async def listen(self, handle: Callable[[bytes], None]) -> None:
        """Subscribe and pass each message's data to `handle`, reconnecting forever (until cancelled)."""
        delay = _RECONNECT_FIRST
        while True:
            client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_keepalive=True,
                health_check_interval=10,
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay = _RECONNECT_FIRST
                log.info("subscribed to Redis channel %s", self.channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_POLL_SECONDS)
                    if message is not None:
                        self._deliver(handle, message.get("data"))
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning(
                    "Redis channel %s: %s; reconnecting in %.1fs", self.channel, type(exc).__name__, delay
                )
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
                    await asyncio.shield(client.aclose())
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    def _deliver(self, handle: Callable[[bytes], None], data: object) -> None:
        if not isinstance(data, bytes) or len(data) > self.max_message_bytes:
            log.warning("ignored a malformed or oversized message on Redis channel %s", self.channel)
            return
        try:
            handle(data)
        except Exception as exc:  # one bad message must not end the subscription
            log.warning("handling a message of Redis channel %s failed: %s", self.channel, type(exc).__name__)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
            self._client = None


__all__ = ["PubSubChannel", "async_client", "ping", "publish_once", "shared_state"]
