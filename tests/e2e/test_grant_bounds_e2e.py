"""End to end through `ztai serve`: task grants from `/oauth/token` bound what `/v1/agents/authorize`
lets through — egress read as URL clients read it, and pattern constraints matched in linear time while
the server goes on answering other requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Gateway, exchange_form, start_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    instance = start_gateway(tmp_path_factory.mktemp("grant-bounds"))
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def parties(gateway: Gateway) -> tuple[str, str]:
    return gateway.token("emma", "tools=web/*"), gateway.token("assistant", kind="agent")


@pytest.fixture(scope="module")
def egress_token(gateway: Gateway, parties: tuple[str, str]) -> str:
    return task_token(gateway, parties, {"egress": ["example.org", "ftp://files.example.org"]})


def exchange(gateway: Gateway, parties: tuple[str, str], details: dict[str, Any]) -> httpx.Response:
    subject, actor = parties
    form = exchange_form(subject, actor, {"tools": ["web/fetch"], **details})
    return httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=30)


def task_token(gateway: Gateway, parties: tuple[str, str], details: dict[str, Any]) -> str:
    response = exchange(gateway, parties, details)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def authorize(gateway: Gateway, token: str, arguments: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{gateway.root_url}/v1/agents/authorize",
        json={"server": "web", "tool": "fetch", "arguments": arguments},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(
    ("url", "effect", "reason"),
    [
        ("https://example.org/x", "allow", ""),
        ("http://EXAMPLE.org./", "allow", ""),
        ("http://evil.com\\@example.org/", "deny", "egress to host evil.com is not granted"),
        ("see evil.ru/x", "deny", "egress to host evil.ru is not granted"),
        ("//evil.ru/x", "deny", "egress to host evil.ru is not granted"),
        ("127.0.0.1/x", "deny", "egress to host 127.0.0.1 is not granted"),
        ("http://0x7f.1/", "deny", "egress to host 127.0.0.1 is not granted"),
        ("file:///etc/passwd", "deny", "egress to file: URLs is not granted"),
        ("ftp://files.example.org/a", "allow", ""),
        ("ftp://example.org/a", "deny", "egress to ftp://example.org is not granted"),
    ],
)
def test_egress_through_the_server(
    gateway: Gateway, egress_token: str, url: str, effect: str, reason: str
) -> None:
    decision = authorize(gateway, egress_token, {"url": url})
    assert decision["effect"] == effect, decision
    assert not reason or any(reason in r for r in decision["reasons"]), decision["reasons"]


def test_long_text_is_read_to_its_end(gateway: Gateway, egress_token: str) -> None:
    body = "word " * 60_000 + "https://evil.ru/collect"  # 300 KB: the host sits past any prefix
    decision = authorize(gateway, egress_token, {"url": "https://example.org/", "body": body})
    assert decision["effect"] == "deny" and any("evil.ru" in r for r in decision["reasons"])


def test_unsafe_patterns_are_refused_at_exchange(gateway: Gateway, parties: tuple[str, str]) -> None:
    for pattern in ["(a)\\1", "(?=x)x", "(a{1000}){1000}"]:
        response = exchange(gateway, parties, {"constraints": {"web/fetch": {"q": [{"pattern": pattern}]}}})
        assert response.status_code == 400, response.text
        error = response.json()
        # GrantError; on the wire RFC 9396 §5's code for authorization details that cannot be granted
        assert (
            error["error"] == "invalid_authorization_details" and "RE2 syntax" in error["error_description"]
        )


def test_a_catastrophic_pattern_answers_fast_and_keeps_the_server_responsive(
    gateway: Gateway, parties: tuple[str, str]
) -> None:
    token = task_token(
        gateway, parties, {"constraints": {"web/fetch": {"q": [{"pattern": "(a+)+$"}]}}, "egress": ["*"]}
    )
    assert authorize(gateway, token, {"q": "aaaa"})["effect"] == "allow"
    adversarial = {"q": "a" * 4000 + "!"}  # 27 characters took 4.2 s with a backtracking engine

    async def both() -> tuple[float, float, dict[str, Any]]:
        async with httpx.AsyncClient(base_url=gateway.root_url, timeout=30) as client:
            headers = {"authorization": f"Bearer {token}"}

            async def timed(coro: Any) -> tuple[float, httpx.Response]:
                started = time.perf_counter()
                response = await coro
                return time.perf_counter() - started, response

            slow = client.post(
                "/v1/agents/authorize",
                json={"server": "web", "tool": "fetch", "arguments": adversarial},
                headers=headers,
            )
            (slow_s, slow_response), (cheap_s, cheap_response) = await asyncio.gather(
                timed(slow), timed(client.get("/readyz"))
            )
            assert cheap_response.status_code == 200
            return slow_s, cheap_s, slow_response.json()

    slow_s, cheap_s, decision = asyncio.run(both())
    assert decision["effect"] == "deny" and "argument 'q' violates constraint pattern" in decision["reasons"]
    assert slow_s < 5.0 and cheap_s < 2.0  # loopback round trips on a busy machine; microseconds of matching
