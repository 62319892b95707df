"""Forwarding to upstream model providers over one pooled async HTTP client (aiohttp).

Upstream API keys are read from the environment variable named in config and only ever put on the
outgoing request; they never reach clients, logs or audit events.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ztai.config import UpstreamSettings
from ztai.errors import ConfigError, NotFound, UpstreamError, UpstreamTimeout

# Response headers worth passing back; hop-by-hop and provider-internal headers are dropped.
_PASS_HEADERS = ("content-type", "openai-processing-ms", "x-request-id")
_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    models: tuple[str, ...]
    timeout: aiohttp.ClientTimeout
    # Built once: the outgoing headers, with the provider key when one is configured.
    headers: dict[str, str] = field(repr=False)


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class Upstreams:
    """The configured upstreams, the model -> upstream routing table and the shared client."""

    def __init__(self, settings: dict[str, UpstreamSettings]) -> None:
        self.by_name: dict[str, Upstream] = {}
        self.by_model: dict[str, Upstream] = {}
        for name, upstream in settings.items():
            headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
            if upstream.api_key_env:
                api_key = os.environ.get(upstream.api_key_env, "")
                if not api_key:
                    raise ConfigError(f"upstreams.{name}.api_key_env: ${upstream.api_key_env} is not set")
                headers["authorization"] = f"Bearer {api_key}"
            timeout = aiohttp.ClientTimeout(total=upstream.timeout_seconds, connect=_CONNECT_TIMEOUT)
            entry = Upstream(name, upstream.base_url, tuple(upstream.models), timeout, headers)
            self.by_name[name] = entry
            for model in upstream.models:
                if model in self.by_model:
                    served_by = self.by_model[model].name
                    raise ConfigError(
                        f"upstreams.{name}.models: model {model!r} is already served by {served_by}"
                    )
                self.by_model[model] = entry
        self._session: aiohttp.ClientSession | None = None

    def for_model(self, model: str) -> Upstream:
        upstream = self.by_model.get(model)
        if upstream is None:
            raise NotFound(f"model {model!r} is not served here", code="model_not_found")
        return upstream

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily, inside the running event loop (aiohttp binds a session to its loop).
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=30, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def post(self, upstream: Upstream, path: str, body: bytes) -> UpstreamResponse:
        with _as_upstream_errors(upstream):
            async with self._send(upstream, path, body) as response:
                content = await response.read()
                return UpstreamResponse(response.status, passed_headers(response), content)

    async def open_stream(self, upstream: Upstream, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Send the request and return the response with its body unread (the caller relays it)."""
        with _as_upstream_errors(upstream):
            response: aiohttp.ClientResponse = await self._send(upstream, path, body)
            return response

    def _send(self, upstream: Upstream, path: str, body: bytes) -> Any:
        return self.session.post(
            upstream.base_url + path,
            data=body,
            headers=upstream.headers,
            timeout=upstream.timeout,
            allow_redirects=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def relay(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Pass an upstream stream through chunk by chunk as it arrives, without buffering it."""
    try:
        async for chunk in response.content.iter_any():
            yield chunk
    except (TimeoutError, aiohttp.ClientError):
        # Headers are already sent: end the stream with an SSE error event the SDK can surface.
        yield b'data: {"error": {"message": "upstream stream failed", "type": "upstream_error"}}\n\n'
    finally:
        response.release()


@contextmanager
def _as_upstream_errors(upstream: Upstream) -> Iterator[None]:
    """Client failures as typed errors: a timeout is 504, anything else 502."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(f"upstream {upstream.name} timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"upstream {upstream.name} failed: {type(exc).__name__}") from None


def passed_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {name: response.headers[name] for name in _PASS_HEADERS if name in response.headers}
