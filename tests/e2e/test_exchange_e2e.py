"""End to end: RFC 8693 token exchange at /oauth/token, task revocation through the admin API and the CLI,
and a second replica learning a revocation through Redis pub/sub."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import redis_url_or_skip
from tests.e2e.conftest import Gateway, exchange_form, free_port, start_gateway

pytestmark = pytest.mark.e2e
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"
HELLO = {"model": "mock", "messages": [{"role": "user", "content": "hello"}]}


def exchange(
    gateway: Gateway, subject: str, actor: str, details: dict[str, Any] | None = None
) -> httpx.Response:
    form = exchange_form(subject, actor, details)
    return httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=10)


def chat(gateway: Gateway, token: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        json=HELLO,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )


def revoke(gateway: Gateway, admin: str, task: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.root_url}/admin/tasks/{task}/revoke",
        json={"reason": "e2e"},
        headers={"authorization": f"Bearer {admin}"},
        timeout=10,
    )


def refused_within(gateway: Gateway, token: str, seconds: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        response = chat(gateway, token)
        if response.status_code == 401:
            assert response.json()["error"]["code"] == "token_revoked"
            return time.monotonic() - began
        time.sleep(0.02)
    raise AssertionError(f"still accepted after {seconds}s")


def test_exchange_delegate_and_revoke_over_http(gateway: Gateway) -> None:
    alice = gateway.token("alice", "tools=files/*,web/fetch", "models=mock")
    planner, worker = gateway.token("planner", kind="agent"), gateway.token("worker", kind="agent")
    root = exchange(
        gateway, alice, planner, {"tools": ["files/*"], "egress": ["*.example.com"], "ttl_seconds": 120}
    )
    assert root.status_code == 200, root.text
    assert root.headers["cache-control"] == "no-store"
    body = root.json()
    assert (
        body["issued_token_type"] == JWT and body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 120
    )
    task_token, task = body["access_token"], body["task"]
    assert chat(gateway, task_token).status_code == 200  # `models` came from alice's token

    child = exchange(gateway, task_token, worker, {"tools": ["files/read_file"]})
    assert child.status_code == 200, child.text
    child_token = child.json()["access_token"]

    wider = exchange(gateway, task_token, worker, {"tools": ["web/fetch"]})
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    assert wider.headers["cache-control"] == "no-store"
    unlisted = exchange(gateway, alice, planner, {"tools": ["mail/send"]})
    denial = unlisted.json()
    assert unlisted.status_code == 400 and denial["error"] == "invalid_target"
    assert denial["decision_id"].startswith("dec_")
    bad = exchange(gateway, alice + "x", planner)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    assert bad.json()["error_description"].startswith("subject_token:")

    assert revoke(gateway, alice, task).status_code == 403  # not an admin
    admin = gateway.token("ops", "roles=admin")
    assert revoke(gateway, admin, "not-a-task").status_code == 422
    revoked = revoke(gateway, admin, task)
    assert revoked.status_code == 200 and revoked.json()["task"] == task
    for token in (task_token, child_token):
        refused = chat(gateway, token)  # the same replica: at once
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "token_revoked"
    assert chat(gateway, alice).status_code == 200  # the subject's own token is untouched
    after = exchange(gateway, task_token, worker)
    assert after.status_code == 400 and "revoked" in after.json()["error_description"]

    tail = gateway.cli("audit", "tail", "-n", "500", "--json").stdout
    events = [json.loads(line) for line in tail.splitlines()]
    exchanges = [e for e in events if e["action"] == "token.exchange"]
    assert {e["effect"] for e in exchanges} == {"allow", "deny"}
    assert any(e["kind"] == "token.issued" and e.get("task") == task for e in events)
    assert any(e["kind"] == "task.revoked" and e.get("task") == task for e in events)
    assert task_token not in tail and child_token not in tail
    gateway.cli("audit", "verify")


def test_the_token_endpoint_refuses_other_shapes(gateway: Gateway) -> None:
    url = f"{gateway.root_url}/oauth/token"
    as_json = httpx.post(url, json={"grant_type": GRANT}, timeout=10)
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    other_grant = httpx.post(url, data={"grant_type": "password"}, timeout=10)
    assert other_grant.status_code == 400 and other_grant.json()["error"] == "unsupported_grant_type"
    huge = httpx.post(
        url, content=b"a" * 2_000_000, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert huge.status_code == 413 and huge.json()["error"] == "invalid_request"
    assert httpx.get(url, timeout=10).status_code == 405


def test_cli_exchange_then_cli_revoke(gateway: Gateway) -> None:
    alice = gateway.token("alice", "tools=files/*", "models=mock")
    planner = gateway.token("planner", kind="agent")
    result = gateway.cli(
        "token",
        "exchange",
        "--subject-token",
        alice,
        "--actor-token",
        planner,
        "--tools",
        "files/read_file",
        "--ttl",
        "60",
    )
    token = result.stdout.strip()
    task = result.stderr.split("task ", 1)[1].split(",", 1)[0]
    assert chat(gateway, token).status_code == 200
    gateway.cli("task", "revoke", task, "--reason", "cli")
    # Another process revoked it: the gateway learns it from the store within its poll interval (1 s).
    assert refused_within(gateway, token, 5.0) < 5.0


# Two replicas, Redis ----------------------------------------------------------------------------------------
@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    redis_url = redis_url_or_skip()
    # Replicas poll the store only every 30 s here: a revocation seen sooner came through Redis.
    env = {"ZTAI_STORE__REDIS_URL": redis_url, "ZTAI_IDENTITY__REVOCATION_REFRESH_SECONDS": "30"}
    first = start_gateway(tmp_path, extra_env=env)
    second = Gateway(first.home, free_port(), first.mock_port, first.env)
    try:
        second.start_server()
        yield first, second
    finally:
        second.close()
        first.close()


def test_revocation_reaches_another_replica_through_redis(replicas: tuple[Gateway, Gateway]) -> None:
    first, second = replicas
    alice = first.token("alice", "tools=files/*", "models=mock")
    response = exchange(first, alice, first.token("planner", kind="agent"), {"tools": ["files/*"]})
    assert response.status_code == 200, response.text
    token, task = response.json()["access_token"], response.json()["task"]
    assert chat(second, token).status_code == 200  # verified and cached on the second replica
    time.sleep(0.5)  # the replicas' subscriptions are live shortly after start
    assert revoke(first, first.token("ops", "roles=admin"), task).status_code == 200
    assert refused_within(second, token, 3.0) < 3.0
