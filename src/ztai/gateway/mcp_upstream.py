"""The upstream side of the MCP gateway: one pooled aiohttp client for the configured MCP servers, the
headers that may cross, bounded reading of JSON and Server-Sent-Event answers.

An MCP server's credential is read from the environment variable named in config and only ever put on
the outgoing request; the client's own bearer token never leaves ztai. Of the client's headers only the
ones the streamable HTTP transport defines cross (session, protocol version, routing headers, Accept,
Content-Type, Last-Event-ID). Every answer is bounded in size (`max_response_bytes`, 502 beyond) and
time (`timeout_seconds`, 504 beyond).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import aiohttp

from ztai.config import McpServerSettings
from ztai.errors import ConfigError, UpstreamResponseTooLarge
from ztai.gateway.sse import SseDecoder, SseEvent
from ztai.gateway.upstream import upstream_errors

# Request headers of the streamable HTTP transport that go upstream (lower case). `mcp-param-*` headers
# (2026 revision: tool arguments mirrored for routing) go too; the server checks them against the body.
FORWARDED_HEADERS = (
    "mcp-session-id",
    "mcp-protocol-version",
    "mcp-method",
    "mcp-name",
    "accept",
    "content-type",
    "last-event-id",
)
PARAM_HEADER_PREFIX = "mcp-param-"
MAX_PARAM_HEADERS = 32
_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class McpUpstream:
    """One configured MCP server."""

    name: str
    url: str
    timeout: aiohttp.ClientTimeout
    max_response_bytes: int
    max_event_bytes: int
    authorization: str = field(default="", repr=False)  # "Bearer <key>" or empty


class McpUpstreams:
    """The configured MCP servers and the shared client that talks to them."""

    def __init__(self, servers: Mapping[str, McpServerSettings]) -> None:
        self.by_name: dict[str, McpUpstream] = {}
        for name, server in servers.items():
            authorization = ""
            if server.api_key_env:
                api_key = os.environ.get(server.api_key_env, "")
                if not api_key:
                    raise ConfigError(
                        f"agents.mcp_servers.{name}.api_key_env: ${server.api_key_env} is not set"
                    )
                authorization = f"Bearer {api_key}"
            timeout = aiohttp.ClientTimeout(
                total=server.timeout_seconds, connect=min(_CONNECT_TIMEOUT, server.timeout_seconds)
            )
            self.by_name[name] = McpUpstream(
                name, server.url, timeout, server.max_response_bytes, server.max_event_bytes, authorization
            )
        self._session: aiohttp.ClientSession | None = None

    def get(self, name: str) -> McpUpstream | None:
        """The server named `name`, or None when none is configured."""
        return self.by_name.get(name)

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop. Unlike the model upstreams, answers are parsed here, so
        # aiohttp decompresses them.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=30, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def send(
        self, upstream: McpUpstream, method: str, headers: Mapping[str, str], body: bytes = b""
    ) -> aiohttp.ClientResponse:
        """Send one HTTP request upstream; the caller reads the answer and must release it."""
        outgoing = dict(headers)
        if upstream.authorization:
            outgoing["authorization"] = upstream.authorization
        with upstream_errors(f"MCP server {upstream.name}"):
            response: aiohttp.ClientResponse = await self.session.request(
                method,
                upstream.url,
                data=body if method == "POST" else None,
                headers=outgoing,
                timeout=upstream.timeout,
                allow_redirects=False,
            )
            return response

    async def close(self) -> None:
        """Close the pooled client (at shutdown)."""
        if self._session is not None:
            await self._session.close()


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's transport headers that go upstream (never Authorization, cookies or anything else)."""
    outgoing = {name: headers[name] for name in FORWARDED_HEADERS if name in headers}
    params = [name for name in headers if name.lower().startswith(PARAM_HEADER_PREFIX)]
    for name in params[:MAX_PARAM_HEADERS]:
        outgoing[name.lower()] = headers[name]
    return outgoing


async def read_bounded(response: aiohttp.ClientResponse, upstream: McpUpstream) -> bytes:
    """The whole body, refusing one over `max_response_bytes` without reading it all."""
    limit = upstream.max_response_bytes
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(upstream)
    chunks: list[bytes] = []
    size = 0
    with upstream_errors(f"MCP server {upstream.name}"):
        async for chunk in response.content.iter_chunked(65_536):
            size += len(chunk)
            if size > limit:
                raise _too_large(upstream)
            chunks.append(chunk)
    return b"".join(chunks)


async def sse_events(
    response: aiohttp.ClientResponse, upstream: McpUpstream
) -> AsyncGenerator[SseEvent, None]:
    """The events of an SSE answer as they arrive; the stream as a whole is bounded like a body."""
    decoder = SseDecoder(upstream.max_event_bytes)
    size = 0
    with upstream_errors(f"MCP server {upstream.name}"):
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > upstream.max_response_bytes:
                raise _too_large(upstream)
            for event in decoder.feed(chunk):
                yield event
    for event in decoder.close():  # a last event the server did not terminate
        yield event


def _too_large(upstream: McpUpstream) -> UpstreamResponseTooLarge:
    return UpstreamResponseTooLarge(
        f"MCP server {upstream.name} answered more than {upstream.max_response_bytes} bytes"
    )
