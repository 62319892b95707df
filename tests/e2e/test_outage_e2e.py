"""End to end: shared state fails closed, visibly. `ztai serve` runs against a Redis of the test's own
(never the machine's); the test stops it mid-task, expects every route that needs it to answer 503 in
its protocol's error format (never 500, never allow) and `/readyz` to name it, starts it again and
expects the very next requests to work without restarting ztai."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Gateway, exchange_form, free_port, start_gateway, stop
from tests.e2e.test_mcp_e2e import API_KEY, workspace  # noqa: F401  (the MCP server fixture)

pytestmark = pytest.mark.e2e
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TOOLS = ["workspace/read_inbox", "workspace/search_files"]


class PrivateRedis:
    """A redis-server of this test alone on a free loopback port, without persistence."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, *arguments, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True, check=False
            )
            if ping.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: PrivateRedis,
    workspace: str,  # noqa: F811
) -> Iterator[Gateway]:
    config = f"\nagents:\n  mcp_servers:\n    workspace:\n      url: {workspace}\n      api_key_env: WORKSPACE_KEY\n"
    instance = start_gateway(
        tmp_path_factory.mktemp("outage"),
        extra_yaml=config,
        extra_env={
            "WORKSPACE_KEY": API_KEY,
            "ZTAI_STORE__REDIS_URL": redis_server.url,
            "ZTAI_STORE__REDIS_TIMEOUT_SECONDS": "1",
        },
    )
    yield instance
    instance.close()


def exchange(gateway: Gateway) -> httpx.Response:
    subject = gateway.token("alice", f"tools={','.join(TOOLS)}")
    actor = gateway.token("mailbot", kind="agent")
    form = exchange_form(subject, actor, {"tools": TOOLS})
    return httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=10)


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
    exchanged = exchange(gateway)
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
    assert exchange(gateway).status_code == 200

    redis_server.start()  # the same port; ztai is not restarted
    assert agents(gateway, token, "authorize", READ).json()["effect"] == "allow"
    assert agents(gateway, token, "observe", OBSERVE).status_code == 200
    again = tools_call(gateway, token)
    assert again.status_code == 200 and "error" not in again.json(), again.text
    assert httpx.get(f"{gateway.root_url}/readyz").status_code == 200
