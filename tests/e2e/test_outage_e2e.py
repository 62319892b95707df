"""End to end: shared state fails closed, visibly. `ztai serve` runs against a Redis, then a PostgreSQL,
of the test's own (never the machine's); the test stops it mid-task, expects every route that needs it
to answer 503 in its protocol's error format (never 500, never allow) and `/readyz` to name it, starts it
again and expects the very next requests to work without restarting ztai."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Gateway, exchange_form, start_gateway
from tests.e2e.test_mcp_e2e import API_KEY, workspace  # noqa: F401  (the MCP server fixture)
from tests.private_servers import PrivatePostgres, PrivateRedis

pytestmark = pytest.mark.e2e
TOOLS = ["workspace/read_inbox", "workspace/search_files"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    if not PrivateRedis.available():
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PrivatePostgres]:
    if not PrivatePostgres.available():
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    server = PrivatePostgres()
    server.init()
    server.start()
    yield server
    server.remove()


def gateway_with(tmp_path_factory: pytest.TempPathFactory, mcp_url: str, **env: str) -> Gateway:
    """A gateway with the workspace MCP server and these settings (as environment variables)."""
    config = (
        f"\nagents:\n  mcp_servers:\n    workspace:\n      url: {mcp_url}\n      api_key_env: WORKSPACE_KEY\n"
    )
    return start_gateway(
        tmp_path_factory.mktemp("outage"), extra_yaml=config, extra_env={"WORKSPACE_KEY": API_KEY, **env}
    )


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: PrivateRedis,
    workspace: str,  # noqa: F811
) -> Iterator[Gateway]:
    env = {"ZTAI_STORE__REDIS_URL": redis_server.url, "ZTAI_STORE__REDIS_TIMEOUT_SECONDS": "1"}
    instance = gateway_with(tmp_path_factory, workspace, **env)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def postgres_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: PrivatePostgres,
    workspace: str,  # noqa: F811
) -> Iterator[Gateway]:
    # Agent sessions in the SQL store too, so the agents API needs the database beyond the audit log.
    env = {"ZTAI_STORE__URL": postgres_server.url, "ZTAI_AGENTS__SESSION_STORE": "sql"}
    instance = gateway_with(tmp_path_factory, workspace, **env)
    yield instance
    instance.close()


def exchange(gateway: Gateway, tokens: tuple[str, str]) -> httpx.Response:
    """The RFC 8693 exchange of (subject token, actor token) for a task token of TOOLS."""
    form = exchange_form(*tokens, {"tools": TOOLS})
    return httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=10)


def identities(gateway: Gateway) -> tuple[str, str]:
    """alice's token and the agent mailbot's (issued by the CLI, which needs the store: before an outage)."""
    return gateway.token("alice", f"tools={','.join(TOOLS)}"), gateway.token("mailbot", kind="agent")


def agents(gateway: Gateway, token: str, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"}
    return httpx.post(f"{gateway.root_url}/v1/agents/{path}", json=body, headers=headers, timeout=10)


def tools_call(gateway: Gateway, token: str) -> httpx.Response:
    """One `tools/call` over raw HTTP in the 2026 era (no session; routing headers name the call)."""
    message = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "search_files",
            "arguments": {"query": "report"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    headers = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-method": "tools/call",
        "mcp-name": "search_files",
        "mcp-protocol-version": "2026-07-28",
    }
    return httpx.post(f"{gateway.root_url}/mcp/workspace", json=message, headers=headers, timeout=10)


READ = {"server": "workspace", "tool": "read_inbox"}
OBSERVE = {"server": "workspace", "tool": "read_inbox", "content": "no new mail"}


def test_a_redis_outage_answers_503_in_each_protocol_and_recovers(
    gateway: Gateway, redis_server: PrivateRedis
) -> None:
    tokens = identities(gateway)
    exchanged = exchange(gateway, tokens)
    assert exchanged.status_code == 200, exchanged.text
    token = str(exchanged.json()["access_token"])
    assert agents(gateway, token, "authorize", READ).json()["effect"] == "allow"
    assert agents(gateway, token, "observe", OBSERVE).status_code == 200
    called = tools_call(gateway, token)
    assert called.status_code == 200 and "error" not in called.json(), called.text
    assert httpx.get(f"{gateway.root_url}/readyz").json()["checks"]["redis"] == "ok"

    redis_server.stop()
    started = time.monotonic()
    for path, body in (("authorize", READ), ("observe", OBSERVE)):
        refused = agents(gateway, token, path, body)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "shared_state_unavailable" and error["type"] == "server_error"
        assert "Redis" in error["message"] and "effect" not in refused.json()
    mcp = tools_call(gateway, token)
    assert mcp.status_code == 503, mcp.text
    assert mcp.json()["error"]["code"] == -32603 and "Redis" in mcp.json()["error"]["message"]
    assert "result" not in mcp.json() and mcp.json()["id"] == 7
    assert time.monotonic() - started < 10  # answered within the client timeouts, no hang
    ready = httpx.get(f"{gateway.root_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert "Redis" in ready.json()["checks"]["redis"] and ready.json()["checks"]["store"] == "ok"
    # The token exchange needs only the database: it still works (and answers RFC 6749 JSON if not).
    assert exchange(gateway, tokens).status_code == 200

    redis_server.start()  # the same port; ztai is not restarted
    assert agents(gateway, token, "authorize", READ).json()["effect"] == "allow"
    assert agents(gateway, token, "observe", OBSERVE).status_code == 200
    again = tools_call(gateway, token)
    assert again.status_code == 200 and "error" not in again.json(), again.text
    assert httpx.get(f"{gateway.root_url}/readyz").status_code == 200


def test_a_postgresql_outage_answers_503_in_each_protocol_and_recovers(
    postgres_gateway: Gateway, postgres_server: PrivatePostgres
) -> None:
    gateway = postgres_gateway
    tokens = identities(gateway)
    exchanged = exchange(gateway, tokens)
    assert exchanged.status_code == 200, exchanged.text
    token = str(exchanged.json()["access_token"])
    assert agents(gateway, token, "authorize", READ).json()["effect"] == "allow"
    assert agents(gateway, token, "observe", OBSERVE).status_code == 200
    assert tools_call(gateway, token).status_code == 200

    postgres_server.stop()
    for path, body in (("authorize", READ), ("observe", OBSERVE)):
        refused = agents(gateway, token, path, body)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "server_error" and "effect" not in refused.json()
    mcp = tools_call(gateway, token)
    assert mcp.status_code == 503 and mcp.json()["error"]["code"] == -32603, mcp.text
    token_refused = exchange(gateway, tokens)
    assert token_refused.status_code == 503, token_refused.text
    assert token_refused.json()["error"] == "temporarily_unavailable"
    assert token_refused.headers["cache-control"] == "no-store" and "access_token" not in token_refused.json()
    ready = httpx.get(f"{gateway.root_url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["checks"]["store"] != "ok"

    postgres_server.start()  # ztai is not restarted
    assert exchange(gateway, tokens).status_code == 200
    assert agents(gateway, token, "authorize", READ).json()["effect"] == "allow"
    assert tools_call(gateway, token).status_code == 200
    assert httpx.get(f"{gateway.root_url}/readyz", timeout=10).status_code == 200
