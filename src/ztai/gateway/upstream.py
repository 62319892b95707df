"""Forwarding to upstream model providers over one pooled async HTTP client (aiohttp).

Upstream API keys are read from the environment variable named in config and only ever put on the
outgoing request; they never reach clients, logs or audit events.

Answers are inspected, so they must be readable: only encodings ztai decodes are accepted (gzip,
deflate, identity), each answer is decoded here (`BodyDecoder`) and bounded after decoding
(`max_response_bytes`, so a zip bomb stops at the bound), and an answer in any other encoding is
refused (502), never passed on. The upstream's `content-encoding` never reaches the client.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ztai.config import UpstreamSettings
from ztai.errors import (
    ConfigError,
    NotFound,
    UpstreamError,
    UpstreamResponseInvalid,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
)

# Response headers worth passing back; hop-by-hop and provider-internal headers are dropped. Rate-limit
# headers reach the client so its SDK backs off as the provider asks (retry-after on a 429).
_PASS_HEADERS = frozenset(
    ("content-type", "openai-processing-ms", "x-request-id", "retry-after", "retry-after-ms")
)
_PASS_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
_MAX_RATE_LIMIT_HEADERS = 32
_MAX_HEADER_VALUE = 256
_CONNECT_TIMEOUT = 5.0
ACCEPT_ENCODING = "gzip, deflate"  # what BodyDecoder undoes; anything else an upstream sends is refused
_READ_CHUNK = 65_536


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    models: tuple[str, ...]
    timeout: aiohttp.ClientTimeout
    max_response_bytes: int
    max_event_bytes: int
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
            headers = {
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "accept-encoding": ACCEPT_ENCODING,
            }
            if upstream.api_key_env:
                api_key = os.environ.get(upstream.api_key_env, "")
                if not api_key:
                    raise ConfigError(f"upstreams.{name}.api_key_env: ${upstream.api_key_env} is not set")
                headers["authorization"] = f"Bearer {api_key}"
            timeout = aiohttp.ClientTimeout(total=upstream.timeout_seconds, connect=_CONNECT_TIMEOUT)
            entry = Upstream(
                name,
                upstream.base_url,
                tuple(upstream.models),
                timeout,
                upstream.max_response_bytes,
                upstream.max_event_bytes,
                headers,
            )
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
        """Send the request and read the whole answer, decoded and bounded."""
        with upstream_errors(f"upstream {upstream.name}"):
            async with self._send(upstream, path, body) as response:
                content = await read_decoded(response, upstream)
                return UpstreamResponse(response.status, passed_headers(response), content)

    async def open_stream(self, upstream: Upstream, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Send the request and return the response with its body unread (the caller relays it). An
        answer in an encoding ztai cannot decode is refused here, before anything is relayed."""
        with upstream_errors(f"upstream {upstream.name}"):
            response: aiohttp.ClientResponse = await self._send(upstream, path, body)
        try:
            BodyDecoder.for_response(response, upstream)
        except UpstreamError:
            response.release()
            raise
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


async def relay(response: aiohttp.ClientResponse, upstream: Upstream) -> AsyncGenerator[bytes, None]:
    """Pass an upstream stream through chunk by chunk as it arrives (decoded, the whole stream bounded
    by `max_response_bytes`), without buffering it. Failures raise UpstreamError: the caller ends the
    stream with an error event."""
    decoder = BodyDecoder.for_response(response, upstream)
    try:
        with upstream_errors(f"upstream {upstream.name}"):
            async for chunk in response.content.iter_any():
                if decoded := decoder.feed(chunk):
                    yield decoded
            if rest := decoder.flush():
                yield rest
    finally:
        response.release()


async def read_decoded(response: aiohttp.ClientResponse, upstream: Upstream) -> bytes:
    """The whole body of an answer, decoded; refused (502) beyond `max_response_bytes`."""
    decoder = BodyDecoder.for_response(response, upstream)
    if response.content_length is not None and response.content_length > upstream.max_response_bytes:
        raise decoder.too_large()
    with upstream_errors(f"upstream {upstream.name}"):
        parts = [decoder.feed(chunk) async for chunk in response.content.iter_chunked(_READ_CHUNK)]
    parts.append(decoder.flush())
    return b"".join(parts)


class BodyDecoder:
    """Undoes an answer's Content-Encoding incrementally (identity, gzip, deflate), counting the decoded
    bytes against a bound so a small compressed body cannot expand without limit."""

    def __init__(self, encoding: str, limit: int, upstream_name: str) -> None:
        self._encoding = encoding
        self._limit = limit
        self._upstream_name = upstream_name
        self._size = 0
        self._head = b""  # deflate: the first bytes, to tell a zlib stream from a raw one
        self._inflater: zlib._Decompress | None = None
        if encoding == "gzip":
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding not in ("identity", "deflate"):
            raise UpstreamResponseInvalid(
                f"upstream {upstream_name} answered in content encoding {encoding!r}, which ztai cannot "
                "decode for inspection",
                code="upstream_encoding_unsupported",
            )

    @classmethod
    def for_response(cls, response: aiohttp.ClientResponse, upstream: Upstream) -> BodyDecoder:
        codings = [c.strip().lower() for c in response.headers.get("content-encoding", "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > 1:
            raise UpstreamResponseInvalid(
                f"upstream {upstream.name} answered in stacked content encodings {codings}",
                code="upstream_encoding_unsupported",
            )
        return cls(codings[0] if codings else "identity", upstream.max_response_bytes, upstream.name)

    def feed(self, chunk: bytes) -> bytes:
        """The decoded bytes `chunk` completes (raises UpstreamResponseTooLarge past the bound)."""
        if self._encoding == "identity":
            return self._counted(chunk)
        if self._inflater is None:  # deflate, not started yet
            self._head += chunk
            if len(self._head) < 2:
                return b""
            chunk, self._head = self._head, b""
            zlib_wrapped = chunk[0] & 0x0F == 8 and int.from_bytes(chunk[:2], "big") % 31 == 0
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        try:
            # At most one byte past the bound is ever produced: the rest of the input stays unexpanded.
            decoded = self._inflater.decompress(chunk, self._limit - self._size + 1)
        except zlib.error:
            raise self._corrupt() from None
        return self._counted(decoded)

    def flush(self) -> bytes:
        """The end of the body: a compressed body must be complete."""
        if self._encoding == "identity":
            return b""
        if self._inflater is None:
            raise self._corrupt()
        try:
            rest = self._inflater.flush()
        except zlib.error:
            raise self._corrupt() from None
        if not self._inflater.eof:
            raise self._corrupt()
        return self._counted(rest)

    def _counted(self, decoded: bytes) -> bytes:
        self._size += len(decoded)
        if self._size > self._limit:
            raise self.too_large()
        return decoded

    def too_large(self) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(
            f"upstream {self._upstream_name} answered more than {self._limit} bytes (decoded)"
        )

    def _corrupt(self) -> UpstreamResponseInvalid:
        return UpstreamResponseInvalid(
            f"upstream {self._upstream_name} sent a {self._encoding} body that does not decode"
        )


@contextmanager
def upstream_errors(who: str) -> Iterator[None]:
    """The one translation of HTTP client failures talking to `who` ("upstream x", "MCP server y"):
    a timeout is UpstreamTimeout (504), anything else UpstreamError (502), naming only the error type."""
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(f"{who} timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{who} failed: {type(exc).__name__}") from None


def passed_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream's headers the client gets: the few of `_PASS_HEADERS` and the rate-limit family
    (bounded in number and length), nothing else."""
    passed: dict[str, str] = {}
    rate_limits = 0
    for name, value in response.headers.items():
        name = name.lower()
        if name in _PASS_HEADERS:
            passed[name] = value
        elif name.startswith(_PASS_PREFIXES) and len(value) <= _MAX_HEADER_VALUE:
            rate_limits += 1
            if rate_limits <= _MAX_RATE_LIMIT_HEADERS:
                passed[name] = value
    return passed
