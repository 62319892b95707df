"""The MCP gateway's mechanics: the real app and runtime in-process, a fake of the agent guard, and a
scripted MCP server (aiohttp) that answers in JSON or SSE and records what reached it."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.loopback import serving
from ztai.agents.guard import Observation
from ztai.config import load_settings
from ztai.errors import AuditUnavailable, ConfigError, RpcProblem
from ztai.gateway.app import create_app
from ztai.gateway.mcp_messages import decode_header_value, parse_message, result_text
from ztai.gateway.mcp_upstream import McpUpstreams
from ztai.gateway.sse import SseDecoder
from ztai.identity import KeyStore, Principal, issue_token
from ztai.identity.task_tokens import act_claim
from ztai.policy import Decision
from ztai.store import open_database

API_KEY = "upstream-key-123"
TOOLS = [
    {"name": "search", "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": True}},
    {"name": "send", "inputSchema": {"type": "object"}},
    {"name": "wipe", "inputSchema": {"type": "object"}, "annotations": {"destructiveHint": True}},
]


# The scripted MCP server -------------------------------------------------------------------------------
@dataclass
class Received:
    method: str
    headers: dict[str, str]
    message: dict[str, Any] | None


Handler = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]


@dataclass
class FakeMcpServer:
    url: str = ""
    form: str = "json"  # or "sse"
    received: list[Received] = field(default_factory=list)
    before: list[dict[str, Any]] = field(default_factory=list)  # SSE messages sent ahead of the answer
    scripted: dict[str, Handler] = field(default_factory=dict)  # by JSON-RPC method

    def calls(self, method: str) -> list[Received]:
        return [r for r in self.received if r.message is not None and r.message.get("method") == method]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        message = json.loads(body) if body else None
        self.received.append(Received(request.method, dict(request.headers), message))
        if request.method == "DELETE":
            return web.Response(status=204)
        assert message is not None
        method = message.get("method")
        if method is None:  # a client's answer to one of our requests
            return web.Response(status=202)
        if method in self.scripted:
            return await self.scripted[method](message)
        if "id" not in message:
            return web.Response(status=202)
        return await self.answer(request, message["id"], self.result_for(message))

    def result_for(self, message: dict[str, Any]) -> dict[str, Any]:
        method, params = message["method"], message.get("params") or {}
        if method == "initialize":
            return {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
            }
        if method == "tools/list":
            return {"tools": TOOLS, "cacheScope": "public", "ttlMs": 60_000}
        if method == "tools/call":
            name = params["name"]
            return {
                "content": [{"type": "text", "text": f"ran {name}"}],
                "structuredContent": {"note": "structured only"},
            }
        return {}

    async def answer(
        self, request: web.Request, request_id: Any, result: dict[str, Any]
    ) -> web.StreamResponse:
        headers = {"mcp-session-id": "upstream-session-1"}
        message = {"jsonrpc": "2.0", "id": request_id, "result": result}
        if self.form == "json":
            return web.json_response(message, headers=headers)
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)
        for extra in [*self.before, message]:
            await response.write(f"event: message\ndata: {json.dumps(extra)}\n\n".encode())
        await response.write_eof()
        return response


@pytest.fixture
async def mcp_server() -> AsyncIterator[FakeMcpServer]:
    server = FakeMcpServer()
    app = web.Application()
    app.router.add_route("*", "/mcp", server.handle)
    async with serving(app) as url:
        server.url = f"{url}/mcp"
        yield server


# A fake of the agent guard (the contract of ztai.agents.guard.AgentGuard) ------------------------------------
@dataclass
class FakeGuard:
    decisions: dict[str, Decision] = field(default_factory=dict)  # by tool; default allow
    learned: list[tuple[str, list[str]]] = field(default_factory=list)
    authorized: list[tuple[str, str, dict[str, Any], str]] = field(default_factory=list)
    observed: list[tuple[str, str, str]] = field(default_factory=list)
    observe_fails: bool = False

    def learn_tools(self, server: str, tools: list[dict[str, Any]]) -> None:
        self.learned.append((server, [t["name"] for t in tools]))

    def visible_tools(
        self, principal: Principal, server: str, tools: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        granted = principal.claims.get("tools") or []
        return [t for t in tools if f"{server}/{t['name']}" in granted]

    async def authorize(
        self,
        principal: Principal,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        *,
        route: str,
        ip: str = "",
    ) -> Decision:
        self.authorized.append((server, tool, arguments, route))
        return self.decisions.get(tool, Decision("allow", ["tools-granted-by-task"], id="dec_allow"))

    async def observe(
        self, principal: Principal, *, server: str, tool: str, content: str, route: str
    ) -> Observation:
        if self.observe_fails:
            raise AuditUnavailable("audit log unavailable")
        self.observed.append((server, tool, content))
        return Observation("evt_1", False, False, 0, [], {})


@dataclass
class Harness:
    client: httpx.AsyncClient
    guard: FakeGuard
    upstream: FakeMcpServer
    home: Path

    def token(self, tools: list[str], *, task: str | None = None, name: str = "alice") -> str:
        task = task or "tsk_" + secrets.token_hex(8)
        issued = issue_token(
            KeyStore.load(self.home / "data"),
            subject=f"spiffe://example.org/user/{name}",
            issuer="spiffe://example.org/service/ztai",
            audience="ztai",
            ttl_seconds=300,
            max_ttl_seconds=3600,
            task={"task": task, "task_chain": [task], "act": act_claim(["spiffe://example.org/agent/bot"])},
            claims={"tools": tools},
        )
        return issued.token

    async def post(
        self,
        message: dict[str, Any] | bytes,
        token: str,
        headers: dict[str, str] | None = None,
        server: str = "ws",
    ) -> httpx.Response:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        return await self.client.post(
            f"/mcp/{server}",
            content=body,
            headers={
                "authorization": f"Bearer {token}",
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                **(headers or {}),
            },
        )


@pytest.fixture
async def harness(
    ztai_home: Path, mcp_server: FakeMcpServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    monkeypatch.setenv("FAKE_MCP_KEY", API_KEY)
    with (ztai_home / "ztai.yaml").open("a") as config:
        config.write(
            "agents:\n  mcp_servers:\n"
            f"    ws: {{url: '{mcp_server.url}', api_key_env: FAKE_MCP_KEY, max_response_bytes: 4096, "
            "timeout_seconds: 1}\n"
        )
    settings = load_settings(ztai_home / "ztai.yaml")
    database = open_database(settings.store_url)
    database.migrate()  # as `ztai init` does
    database.close()
    app = create_app(settings)
    guard = FakeGuard()
    async with app.router.lifespan_context(app):
        real_guard, app.state.runtime.agents = app.state.runtime.agents, guard
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://ztai.test") as client:
                yield Harness(client, guard, mcp_server, ztai_home)
        finally:
            app.state.runtime.agents = real_guard  # closed with the runtime


def request(method: str, params: dict[str, Any] | None = None, request_id: int | str = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def sse_messages(response: httpx.Response) -> list[dict[str, Any]]:
    events = SseDecoder().feed(response.content)
    return [json.loads(event.data) for event in events if event.data]


# Pure functions --------------------------------------------------------------------------------------------
def test_messages_are_single_bounded_json_rpc_objects() -> None:
    assert parse_message(b'{"jsonrpc":"2.0","id":"a","method":"ping"}', 32)["method"] == "ping"
    cases = {
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]': (-32600, "batches are not supported"),
        b"{nope": (-32700, "not valid JSON"),
        b'{"id":1,"method":"ping"}': (-32600, "JSON-RPC 2.0"),
        b'{"jsonrpc":"2.0","id":true,"method":"ping"}': (-32600, "id must be"),
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}': (-32602, "params must be an object"),
        b'{"jsonrpc":"2.0","id":1,"method":"x","params":' + b'{"a":' * 70 + b"1" + b"}" * 71: (
            -32600,
            "deeper",
        ),
    }
    for body, (code, words) in cases.items():
        with pytest.raises(RpcProblem) as problem:
            parse_message(body, 32)
        assert (
            problem.value.rpc_code == code and words in problem.value.message and problem.value.status == 400
        )


def test_header_values_and_result_text() -> None:
    assert decode_header_value("search") == "search"
    assert decode_header_value("=?base64?c8OkdXNl?=") == "säuse"
    assert decode_header_value("=?base64?***?=") is None
    result = {
        "content": [
            {"type": "text", "text": '{"name": "report"}'},
            {"type": "image", "data": "AAAA"},
            {"type": "resource", "resource": {"uri": "file:///a", "text": "embedded"}},
        ],
        "structuredContent": {"name": "report", "hidden": "only here"},
    }
    assert result_text(result) == '{"name": "report"}\nembedded\nonly here'


def test_a_missing_server_credential_fails_at_start(ztai_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABSENT_MCP_KEY", raising=False)
    with (ztai_home / "ztai.yaml").open("a") as config:
        config.write(
            "agents:\n  mcp_servers:\n    ws: {url: 'http://127.0.0.1:1/mcp', api_key_env: ABSENT_MCP_KEY}\n"
        )
    settings = load_settings(ztai_home / "ztai.yaml")
    with pytest.raises(ConfigError, match="ABSENT_MCP_KEY"):
        McpUpstreams(settings.agents.mcp_servers)


# Through the app -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["json", "sse"])
async def test_tools_list_shows_granted_tools_in_the_servers_form(harness: Harness, form: str) -> None:
    harness.upstream.form = form
    response = await harness.post(request("tools/list"), harness.token(["ws/search", "ws/send"]))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        "application/json" if form == "json" else "text/event-stream"
    )
    answer = response.json() if form == "json" else sse_messages(response)[-1]
    assert [t["name"] for t in answer["result"]["tools"]] == ["search", "send"]
    assert answer["result"]["cacheScope"] == "private"  # the list depends on who asked
    assert harness.guard.learned == [("ws", ["search", "send", "wipe"])]  # the guard learned all of them


async def test_upstream_gets_its_own_credential_and_transport_headers_only(harness: Harness) -> None:
    token = harness.token(["ws/search"])
    await harness.post(
        request("tools/list"),
        token,
        headers={
            "cookie": "sid=1",
            "mcp-protocol-version": "2025-11-25",
            "mcp-param-region": "eu",
            "x-other": "1",
        },
    )
    seen = {k.lower(): v for k, v in harness.upstream.received[-1].headers.items()}
    assert seen["authorization"] == f"Bearer {API_KEY}"
    assert token not in json.dumps(seen)
    assert seen["mcp-protocol-version"] == "2025-11-25" and seen["mcp-param-region"] == "eu"
    assert "cookie" not in seen and "x-other" not in seen


async def test_a_refused_call_never_reaches_the_server_and_explains_itself(harness: Harness) -> None:
    harness.guard.decisions["wipe"] = Decision(
        "deny", ["default-deny", "tool ws/wipe is not granted to this task"], id="dec_1"
    )
    harness.guard.decisions["send"] = Decision(
        "require_approval", ["approve-side-effects-after-injection"], id="dec_2", approval_id="apr_42"
    )
    token = harness.token(["ws/search"])
    denied = await harness.post(request("tools/call", {"name": "wipe", "arguments": {"path": "/"}}, 7), token)
    held = await harness.post(request("tools/call", {"name": "send", "arguments": {}}, "x"), token)
    assert denied.status_code == held.status_code == 200
    assert denied.json()["id"] == 7 and denied.json()["error"]["code"] == -32003
    assert denied.json()["error"]["data"] == {
        "decision_id": "dec_1",
        "effect": "deny",
        "reasons": ["default-deny", "tool ws/wipe is not granted to this task"],
        "approval_id": None,
    }
    error = held.json()["error"]
    assert held.json()["id"] == "x" and error["code"] == -32004 and "apr_42" in error["message"]
    assert error["data"]["approval_id"] == "apr_42" and error["data"]["effect"] == "require_approval"
    assert harness.upstream.calls("tools/call") == []
    assert harness.guard.authorized[0] == ("ws", "wipe", {"path": "/"}, "/mcp/ws")


@pytest.mark.parametrize("form", ["json", "sse"])
async def test_an_allowed_call_is_observed_and_returned_unchanged(harness: Harness, form: str) -> None:
    harness.upstream.form = form
    harness.upstream.before = [
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}},
        {"jsonrpc": "2.0", "id": 99, "method": "sampling/createMessage", "params": {"messages": []}},
    ]
    response = await harness.post(
        request("tools/call", {"name": "search", "arguments": {"q": "x"}}), harness.token([])
    )
    if form == "json":
        answer = response.json()
    else:
        messages = sse_messages(response)
        assert [m.get("method") for m in messages] == ["notifications/progress", None]  # no server request
        answer = messages[-1]
        await asyncio.sleep(0.1)  # the refusal of the server's request is posted in the background
        refusal = [r.message for r in harness.upstream.received if r.message and r.message.get("id") == 99]
        assert refusal and refusal[0]["error"]["code"] == -32601
        assert "sampling/createMessage" in refusal[0]["error"]["message"]
    assert answer == {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "content": [{"type": "text", "text": "ran search"}],
            "structuredContent": {"note": "structured only"},
        },
    }
    assert harness.guard.observed == [("ws", "search", "ran search\nstructured only")]


async def test_a_result_that_cannot_be_observed_is_withheld(harness: Harness) -> None:
    harness.guard.observe_fails = True
    response = await harness.post(request("tools/call", {"name": "search"}), harness.token([]))
    assert response.json()["error"]["code"] == -32603
    assert "audit" in response.json()["error"]["message"] and "result" not in response.json()


async def test_sessions_are_bound_to_the_caller(harness: Harness) -> None:
    alice, mallory = harness.token(["ws/search"]), harness.token(["ws/search"], name="mallory")
    initialized = await harness.post(request("initialize", {"protocolVersion": "2025-11-25"}), alice)
    session = initialized.headers["mcp-session-id"]
    assert session.startswith("upstream-session-1.") and session != "upstream-session-1"
    # Capabilities of families ztai never relays are not advertised.
    assert initialized.json()["result"]["capabilities"] == {"tools": {}}
    ok = await harness.post(request("ping"), alice, headers={"mcp-session-id": session})
    assert ok.status_code == 200
    assert harness.upstream.received[-1].headers["mcp-session-id"] == "upstream-session-1"
    for stolen in (session, "upstream-session-1", session[:-1] + "0"):
        refused = await harness.post(request("ping"), mallory, headers={"mcp-session-id": stolen})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == -32600
    assert len(harness.upstream.calls("ping")) == 1
    ended = await harness.client.delete(
        "/mcp/ws", headers={"authorization": f"Bearer {alice}", "mcp-session-id": session}
    )
    assert ended.status_code == 204
    assert harness.upstream.received[-1].method == "DELETE"
    assert harness.upstream.received[-1].headers["mcp-session-id"] == "upstream-session-1"


async def test_methods_outside_tools_and_lifecycle_are_refused(harness: Harness) -> None:
    token = harness.token(["ws/search"])
    for method in (
        "resources/read",
        "prompts/get",
        "tasks/list",
        "subscriptions/listen",
        "sampling/createMessage",
    ):
        response = await harness.post(request(method, {}), token)
        assert response.status_code == 200 and response.json()["error"]["code"] == -32601
        assert method in response.json()["error"]["message"]
    answer = await harness.post({"jsonrpc": "2.0", "id": 5, "result": {}}, token)
    assert answer.status_code == 400
    notified = await harness.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, token)
    assert notified.status_code == 202
    assert [r.message["method"] for r in harness.upstream.received if r.message] == [
        "notifications/initialized"
    ]
    batch = await harness.post([request("ping")], token)  # type: ignore[arg-type]
    assert batch.status_code == 400 and "batches" in batch.json()["error"]["message"]


async def test_routing_headers_must_match_the_body(harness: Harness) -> None:
    token = harness.token(["ws/search"])
    call = request("tools/call", {"name": "search", "arguments": {}})
    lying = await harness.post(call, token, headers={"mcp-method": "tools/call", "mcp-name": "wipe"})
    assert lying.status_code == 400 and lying.json()["error"]["code"] == -32020
    wrong_method = await harness.post(call, token, headers={"mcp-method": "ping"})
    assert wrong_method.json()["error"]["code"] == -32020
    honest = await harness.post(call, token, headers={"mcp-method": "tools/call", "mcp-name": "search"})
    assert "result" in honest.json()
    assert harness.guard.authorized == [("ws", "search", {}, "/mcp/ws")]


async def test_unknown_server_get_and_missing_token(harness: Harness) -> None:
    token = harness.token([])
    unknown = await harness.post(request("ping"), token, server="nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == -32600
    stream = await harness.client.get("/mcp/ws", headers={"authorization": f"Bearer {token}"})
    assert stream.status_code == 405 and stream.headers["allow"] == "POST, DELETE"
    anonymous = await harness.client.post("/mcp/ws", content=json.dumps(request("ping")))
    assert anonymous.status_code == 401 and "www-authenticate" in anonymous.headers
    assert harness.upstream.received == []


async def test_upstream_failures_become_json_rpc_errors(harness: Harness) -> None:
    token = harness.token([])

    async def huge(message: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"x": "y" * 10_000}})

    async def slow(message: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {}})

    async def broken(_message: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    async def unauthorized(_message: dict[str, Any]) -> web.StreamResponse:
        return web.Response(status=401)

    async def gone(message: dict[str, Any]) -> web.StreamResponse:
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}
        return web.json_response(error, status=404)

    async def wrong_id(message: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"jsonrpc": "2.0", "id": 12345, "result": {}})

    expected = {
        huge: (502, -32010, "more than 4096 bytes"),
        slow: (504, -32001, "timed out"),
        broken: (502, -32010, "HTTP 500"),
        unauthorized: (502, -32010, "HTTP 401"),
        gone: (404, -32600, "Session not found"),
        wrong_id: (502, -32010, "did not answer request 1"),
    }
    for handler, (status, code, words) in expected.items():
        harness.upstream.scripted["ping"] = handler
        response = await harness.post(request("ping"), token)
        assert response.status_code == status, handler.__name__
        assert response.json()["id"] == 1
        assert response.json()["error"]["code"] == code and words in response.json()["error"]["message"]


async def test_a_stream_without_an_answer_and_input_requests_are_errors(harness: Harness) -> None:
    token = harness.token([])
    harness.upstream.form = "sse"

    async def hang_up(message: dict[str, Any]) -> web.StreamResponse:
        return web.Response(
            body=b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/x"}\n\n',
            content_type="text/event-stream",
        )

    harness.upstream.scripted["ping"] = hang_up
    ended = sse_messages(await harness.post(request("ping"), token))
    assert ended[-1]["error"]["code"] == -32010 and "ended without answering" in ended[-1]["error"]["message"]

    async def elicit(message: dict[str, Any]) -> web.StreamResponse:
        result = {"resultType": "input_required", "inputRequests": {"a": {"method": "elicitation/create"}}}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    harness.upstream.scripted["tools/call"] = elicit
    asked = await harness.post(request("tools/call", {"name": "search"}), token)
    assert (
        asked.json()["error"]["code"] == -32601
        and "elicitation or sampling" in asked.json()["error"]["message"]
    )


async def test_task_results_are_observed_and_only_for_the_task_that_started_them(harness: Harness) -> None:
    async def start_task(message: dict[str, Any]) -> web.StreamResponse:
        task = {"taskId": "t-1", "status": "working"}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"task": task}})

    async def task_result(message: dict[str, Any]) -> web.StreamResponse:
        result = {"content": [{"type": "text", "text": "late result"}]}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    harness.upstream.scripted.update({"tools/call": start_task, "tasks/result": task_result})
    owner, other = harness.token(["ws/send"]), harness.token(["ws/send"])
    started = await harness.post(
        request("tools/call", {"name": "send", "arguments": {}, "task": {"ttl": 1000}}), owner
    )
    assert started.json()["result"]["task"]["taskId"] == "t-1"
    assert harness.guard.observed == []
    stranger = await harness.post(request("tasks/result", {"taskId": "t-1"}), other)
    assert stranger.json()["error"]["code"] == -32003
    fetched = await harness.post(request("tasks/result", {"taskId": "t-1"}), owner)
    assert fetched.json()["result"]["content"][0]["text"] == "late result"
    assert harness.guard.observed == [("ws", "send", "late result")]
    assert len(harness.upstream.calls("tasks/result")) == 1
