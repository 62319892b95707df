"""Upstream forwarding: the provider key goes to the provider only; failures map to 502/504."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.loopback import serving
from ztai.config import UpstreamSettings
from ztai.errors import ConfigError, NotFound, UpstreamError, UpstreamTimeout
from ztai.gateway.upstream import Upstreams, relay


async def echo(request: web.Request) -> web.Response:
    if request.path.endswith("/slow"):
        await asyncio.sleep(2)
    return web.json_response(
        {"authorization": request.headers.get("authorization"), "body": (await request.read()).decode()},
        headers={"x-request-id": "req-1", "x-internal-secret": "do-not-forward"},
    )


async def stream(_request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(_request)
    for index in range(3):
        await response.write(f"data: {index}\n\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


@pytest.fixture
async def provider() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    app.router.add_post("/v1/slow", echo)
    app.router.add_post("/v1/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


async def test_provider_key_from_the_environment_is_sent_upstream_only(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PROVIDER_KEY", "sk-provider-secret")
    upstreams = Upstreams(
        {"p": UpstreamSettings(base_url=provider, api_key_env="TEST_PROVIDER_KEY", models=["m"])}
    )
    try:
        result = await upstreams.post(upstreams.for_model("m"), "/chat/completions", b'{"model":"m"}')
    finally:
        await upstreams.close()
    assert result.status == 200
    assert json.loads(result.body)["authorization"] == "Bearer sk-provider-secret"
    assert result.headers == {"content-type": "application/json; charset=utf-8", "x-request-id": "req-1"}
    assert "sk-provider-secret" not in repr(upstreams.by_name["p"])  # nor in logs that print it


def test_missing_provider_key_and_duplicate_models_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABSENT_KEY", raising=False)
    with pytest.raises(ConfigError, match="ABSENT_KEY"):
        Upstreams({"p": UpstreamSettings(base_url="http://x/v1", api_key_env="ABSENT_KEY")})
    with pytest.raises(ConfigError, match="already served"):
        Upstreams(
            {
                "a": UpstreamSettings(base_url="http://a/v1", models=["m"]),
                "b": UpstreamSettings(base_url="http://b/v1", models=["m"]),
            }
        )
    with pytest.raises(NotFound):
        Upstreams({}).for_model("m")


async def test_unreachable_and_slow_upstreams(provider: str) -> None:
    upstreams = Upstreams(
        {
            "dead": UpstreamSettings(base_url="http://127.0.0.1:9/v1", models=["dead"]),
            "slow": UpstreamSettings(base_url=provider, models=["slow"], timeout_seconds=0.2),
        }
    )
    try:
        with pytest.raises(UpstreamError) as failed:
            await upstreams.post(upstreams.for_model("dead"), "/chat/completions", b"{}")
        assert failed.value.status == 502
        with pytest.raises(UpstreamTimeout) as slow:
            await upstreams.post(upstreams.for_model("slow"), "/slow", b"{}")
        assert slow.value.status == 504
    finally:
        await upstreams.close()


async def test_streams_are_relayed_chunk_by_chunk(provider: str) -> None:
    upstreams = Upstreams({"p": UpstreamSettings(base_url=provider, models=["m"])})
    try:
        response = await upstreams.open_stream(upstreams.for_model("m"), "/stream", b"{}")
        chunks = [chunk async for chunk in relay(response, upstreams.for_model("m"))]
    finally:
        await upstreams.close()
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert len(chunks) >= 2  # not buffered into one


async def rate_limited(_request: web.Request) -> web.Response:
    headers = {
        "retry-after": "3",
        "retry-after-ms": "3000",
        "x-ratelimit-remaining-requests": "0",
        "X-RateLimit-Reset-Tokens": "1s",
        "anthropic-ratelimit-requests-remaining": "0",
        "x-ratelimit-huge": "x" * 1000,  # over the length bound: dropped
        "x-internal-secret": "do-not-forward",
        "set-cookie": "session=1",
    }
    headers.update({f"x-ratelimit-extra-{index}": "1" for index in range(40)})
    return web.json_response({"error": {"message": "slow down"}}, status=429, headers=headers)


async def test_only_rate_limit_headers_are_passed_back_bounded() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", rate_limited)
    async with serving(app) as base_url:
        upstreams = Upstreams({"p": UpstreamSettings(base_url=f"{base_url}/v1", models=["m"])})
        try:
            result = await upstreams.post(upstreams.for_model("m"), "/chat/completions", b"{}")
        finally:
            await upstreams.close()
    assert result.status == 429
    headers = result.headers
    assert headers["retry-after"] == "3" and headers["retry-after-ms"] == "3000"
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-reset-tokens"] == "1s"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert (
        "x-internal-secret" not in headers
        and "set-cookie" not in headers
        and "x-ratelimit-huge" not in headers
    )
    assert sum(1 for name in headers if "ratelimit" in name) == 32  # a bounded number of them
