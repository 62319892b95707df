"""Forwarding to upstream model providers over one pooled async HTTP client.

Upstream API keys are read from the environment variable named in config and only ever put on the
outgoing request; they never reach clients, logs or audit events.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from ztai.config import UpstreamSettings
from ztai.errors import ConfigError, NotFound, UpstreamError, UpstreamTimeout

# Response headers worth passing back; hop-by-hop and provider-internal headers are dropped.
_PASS_HEADERS = ("content-type", "openai-processing-ms", "x-request-id")


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    models: tuple[str, ...]
    api_key: str
    timeout: float


@dataclass
class UpstreamResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class Upstreams:
    """The configured upstreams and the model -> upstream routing table."""

    def __init__(self, settings: dict[str, UpstreamSettings]) -> None:
        self.by_name: dict[str, Upstream] = {}
        self.by_model: dict[str, Upstream] = {}
        for name, upstream in settings.items():
            api_key = ""
            if upstream.api_key_env:
                api_key = os.environ.get(upstream.api_key_env, "")
                if not api_key:
                    raise ConfigError(f"upstreams.{name}.api_key_env: ${upstream.api_key_env} is not set")
            entry = Upstream(
                name, upstream.base_url, tuple(upstream.models), api_key, upstream.timeout_seconds
            )
            self.by_name[name] = entry
            for model in upstream.models:
                if model in self.by_model:
                    raise ConfigError(
                        f"upstreams.{name}.models: model {model!r} is already served by "
                        f"{self.by_model[model].name}"
                    )
                self.by_model[model] = entry
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=30),
            timeout=httpx.Timeout(60.0, connect=5.0),
            follow_redirects=False,
            trust_env=False,
        )

    def for_model(self, model: str) -> Upstream:
        upstream = self.by_model.get(model)
        if upstream is None:
            raise NotFound(f"model {model!r} is not served here", code="model_not_found")
        return upstream

    def _request(self, upstream: Upstream, path: str, body: bytes) -> httpx.Request:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if upstream.api_key:
            headers["authorization"] = f"Bearer {upstream.api_key}"
        return self._client.build_request(
            "POST",
            f"{upstream.base_url}{path}",
            content=body,
            headers=headers,
            timeout=httpx.Timeout(upstream.timeout, connect=5.0),
        )

    async def post(self, upstream: Upstream, path: str, body: bytes) -> UpstreamResponse:
        try:
            response = await self._client.send(self._request(upstream, path, body))
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"upstream {upstream.name} timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {upstream.name} failed: {type(exc).__name__}") from None
        return UpstreamResponse(response.status_code, passed_headers(response), response.content)

    async def open_stream(self, upstream: Upstream, path: str, body: bytes) -> httpx.Response:
        """Send the request and return the response with its body still unread (the caller streams it)."""
        try:
            return await self._client.send(self._request(upstream, path, body), stream=True)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"upstream {upstream.name} timed out") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {upstream.name} failed: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._client.aclose()


async def relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """Pass an upstream stream through chunk by chunk, without buffering it."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        # Headers are already sent: end the stream with an SSE error event the SDK can surface.
        yield b'data: {"error": {"message": "upstream stream failed", "type": "upstream_error"}}\n\n'
    finally:
        await response.aclose()


def passed_headers(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in _PASS_HEADERS if name in response.headers}
