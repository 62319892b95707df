"""The MCP gateway: ztai proxies the configured MCP servers at `/mcp/<server>` (streamable HTTP transport).

A JSON-RPC-aware reverse proxy that works across MCP revisions (the `initialize` handshake era and the
2026 `server/discover` era). Every POST is admitted (bounded body, bearer token -> principal) and holds
exactly one JSON-RPC message (batches are refused). By method:

- lifecycle and harmless methods pass through: `initialize`, `server/discover`, `ping`, `notifications/*`,
  `logging/setLevel`, `completion/complete` (the server's capabilities for the refused families below are
  removed from the `initialize` / `server/discover` answer, so clients do not try them);
- `tools/list`: the server's tools are learned by the agent guard (annotations) and the caller sees only
  the tools its task grants;
- `tools/call`: decided by the agent guard before anything is forwarded (audited, durable); a refusal is a
  JSON-RPC error with the decision; an allowed call's result is observed (session taint, provenance) and
  returned unchanged. A task-augmented call's task can then be polled (`tasks/get`), cancelled
  (`tasks/cancel`) and its result fetched (`tasks/result`, observed like a call result) by the same task
  through the same gateway process;
- everything else is refused with JSON-RPC "method not found" naming the method (fail closed):
  resources/*, prompts/*, tasks/list, subscriptions/listen, and client answers to server requests. ztai
  relays no server-initiated requests: `GET` (the server's own stream) is 405; a sampling, elicitation or
  roots request a server sends inside an answer is answered upstream with an error and not relayed; a
  modern `input_required` result that asks the client for input becomes an error.

Refusals are HTTP 200 with a JSON-RPC error and the same `id`; `data` holds `decision_id`, `effect`,
`reasons` and `approval_id` (error codes: `ztai.gateway.mcp_messages`).

Upstream `Mcp-Session-Id`s are handed to the client bound to the caller (tenant, subject, task) with a
keyed MAC, so one principal can never ride another's upstream session; an id that does not verify is
"unknown session" (404), as the transport prescribes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ztai.agents.guard import AgentGuard
from ztai.errors import AuthenticationError, RpcProblem, ZtaiError
from ztai.gateway import metrics
from ztai.gateway.mcp_messages import (
    EFFECT_CODES,
    FORBIDDEN,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_ID_LENGTH,
    MAX_METHOD_LENGTH,
    METHOD_NOT_FOUND,
    UPSTREAM_FAILED,
    Message,
    check_routing_headers,
    json_object,
    parse_message,
    parse_upstream_json,
    problem_of,
    result_text,
    rpc_error,
)
from ztai.gateway.mcp_upstream import (
    McpUpstream,
    McpUpstreams,
    forwarded_headers,
    read_bounded,
    sse_events,
)
from ztai.gateway.pipeline import admit
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.gateway.sse import SseEvent, encode_sse
from ztai.identity import Principal

log = logging.getLogger("ztai.gateway.mcp")

PASS_THROUGH = frozenset({"initialize", "server/discover", "ping", "logging/setLevel", "completion/complete"})
TASK_METHODS = frozenset({"tasks/result", "tasks/get", "tasks/cancel"})
REFUSED_CAPABILITIES = ("resources", "prompts")  # families of methods that are never relayed
_METRIC_METHODS = PASS_THROUGH | TASK_METHODS | {"tools/list", "tools/call"}
MAX_TOOL_NAME_LENGTH = 128
_SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII, as the transport requires

Rewrite = Callable[[Message], Awaitable[Message]]


# Gateway state -----------------------------------------------------------------------------------------
class TaskOwners:
    """Which tool a task-augmented call started, by owner (bounded, least recently used first out).

    Held in process memory: a task must be polled through the gateway process that started it; anywhere
    else it is unknown and refused (fail closed)."""

    def __init__(self, *, max_entries: int = 10_000, ttl_seconds: float = 3600.0) -> None:
        self._entries: OrderedDict[tuple[str, str, str], tuple[str, float]] = OrderedDict()
        self._max_entries = max_entries
        self._ttl = ttl_seconds

    def remember(self, owner: str, server: str, task_id: str, tool: str) -> None:
        """Note that `owner` started task `task_id` on `server` by calling `tool`."""
        key = (owner, server, task_id)
        self._entries[key] = (tool, time.monotonic() + self._ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def tool_for(self, owner: str, server: str, task_id: str) -> str | None:
        """The tool whose task this is, when `owner` started it here and it has not expired."""
        entry = self._entries.get((owner, server, task_id))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]


@dataclass
class McpGateway:
    """What the MCP routes hold between requests: upstream clients, the session key, started tasks."""

    upstreams: McpUpstreams
    session_key: bytes = field(repr=False)
    tasks: TaskOwners = field(default_factory=TaskOwners)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def build(cls, runtime: Runtime) -> McpGateway:
        """From the runtime's settings; raises ConfigError when a server's credential variable is unset."""
        agents = runtime.settings.agents
        key = hmac.new(runtime.audit.finding_key, b"ztai mcp session binding", hashlib.sha256).digest()
        return cls(McpUpstreams(agents.mcp_servers), key, TaskOwners(ttl_seconds=agents.max_task_ttl_seconds))

    def in_background(self, work: Awaitable[None]) -> None:
        """Run `work` detached, keeping a reference until it finishes (cancelled at close)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Cancel background work and close the upstream client."""
        for task in list(self._background):
            task.cancel()
        await self.upstreams.close()


# Routes ------------------------------------------------------------------------------------------------
async def mcp_endpoint(request: Request) -> Response:
    """`/mcp/<server>`: POST carries one JSON-RPC message, DELETE ends a session, GET is not offered."""
    if request.method == "GET":
        # The server-initiated stream would carry requests to the client; ztai relays none (the
        # transport lets a server answer 405 here).
        problem = rpc_error(None, METHOD_NOT_FOUND, "ztai's MCP gateway offers no server-initiated stream")
        return JSONResponse(problem, status_code=405, headers={"allow": "POST, DELETE"})
    runtime: Runtime = request.app.state.runtime
    gateway: McpGateway = request.app.state.mcp
    body, principal = await admit(runtime.identity, runtime.settings.server, request)
    server = request.path_params["server"]
    upstream = gateway.upstreams.get(server)
    if upstream is None:
        return JSONResponse(
            rpc_error(None, INVALID_REQUEST, f"no MCP server named {server[:64]!r}"), status_code=404
        )
    exchange = Exchange(runtime, gateway, request, upstream, principal, body)
    if request.method == "DELETE":
        return await exchange.end_session()
    return await exchange.handle()


@dataclass
class Exchange:
    """One client message on its way to an MCP server and back."""

    runtime: Runtime
    gateway: McpGateway
    request: Request
    upstream: McpUpstream
    principal: Principal
    body: bytes
    message: Message = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # what goes upstream

    @property
    def server(self) -> str:
        return self.upstream.name

    @property
    def request_id(self) -> str | int | None:
        value = self.message.get("id")
        return value if isinstance(value, str | int) else None

    @property
    def method(self) -> str:
        return str(self.message.get("method", ""))

    @property
    def params(self) -> dict[str, Any]:
        params = self.message.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def guard(self) -> AgentGuard:
        return self.runtime.agents

    @property
    def owner(self) -> str:
        """Who the caller is for binding sessions and tasks: tenant, subject and task (if any)."""
        task = self.principal.claims.get("task")
        return "\0".join(
            (self.principal.tenant, self.principal.spiffe_id, task if isinstance(task, str) else "")
        )

    # The message -----------------------------------------------------------------------------------------
    async def handle(self) -> Response:
        """Answer one POSTed message; every refusal is a JSON-RPC error, counted by effect."""
        try:
            self.message = parse_message(self.body, self.runtime.settings.server.max_json_depth)
            self.headers = self.outgoing_headers()
            check_routing_headers(self.request.headers, self.message)
            response, effect = await self.dispatch()
        except RpcProblem as problem:
            response, effect = self.problem_response(problem), "error" if problem.status >= 500 else "refused"
        except AuthenticationError:
            raise  # 401 with WWW-Authenticate, as for every route
        except ZtaiError as error:
            response, effect = self.problem_response(problem_of(error)), "error"
        metrics.MCP_MESSAGES.labels(self.server, self.method_label(), effect).inc()
        return response

    async def dispatch(self) -> tuple[Response, str]:
        """Route the message by method; returns the response and the effect for metrics."""
        method = self.method
        if "method" not in self.message:
            raise RpcProblem(
                INVALID_REQUEST,
                "ztai relays no server-initiated requests, so there is nothing to answer",
                status=400,
            )
        if "id" not in self.message:
            if not method.startswith("notifications/"):
                raise RpcProblem(
                    METHOD_NOT_FOUND, f"notification {method!r} is not relayed by ztai", status=400
                )
            return await self.forward(None), "forwarded"
        if method in PASS_THROUGH:
            lifecycle = method in ("initialize", "server/discover")
            return await self.forward(self.without_refused_capabilities if lifecycle else None), "forwarded"
        if method == "tools/list":
            return await self.forward(self.visible_tools), "forwarded"
        if method == "tools/call":
            return await self.call_tool()
        if method in TASK_METHODS:
            return await self.task_request(), "forwarded"
        raise RpcProblem(
            METHOD_NOT_FOUND,
            f"method {method!r} is not relayed by ztai's MCP gateway "
            "(only lifecycle, tools and task results are)",
        )

    async def call_tool(self) -> tuple[Response, str]:
        """tools/call: the guard decides before anything is forwarded; the result is observed."""
        name, arguments = self.params.get("name"), self.params.get("arguments", {})
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TOOL_NAME_LENGTH:
            raise RpcProblem(INVALID_PARAMS, "tools/call needs params.name, a tool name", status=400)
        if not isinstance(arguments, dict):
            raise RpcProblem(INVALID_PARAMS, "tools/call params.arguments must be an object", status=400)
        decision = await self.guard.authorize(
            self.principal, self.server, name, arguments, route=self.request.url.path, ip=self.client_ip
        )
        if not decision.allowed:
            data = {
                "decision_id": decision.id,
                "effect": decision.effect,
                "reasons": decision.reasons,
                "approval_id": decision.approval_id,
            }
            code = EFFECT_CODES.get(decision.effect, FORBIDDEN)
            return self.problem_response(RpcProblem(code, str(decision.error()), data=data)), decision.effect

        async def observe(message: Message) -> Message:
            return await self.observe_result(name, message, task_augmented="task" in self.params)

        return await self.forward(observe), decision.effect

    async def task_request(self) -> Response:
        """tasks/get, tasks/cancel, tasks/result: only for a task this caller started here."""
        task_id = self.params.get("taskId")
        if not isinstance(task_id, str) or not 0 < len(task_id) <= MAX_ID_LENGTH:
            raise RpcProblem(INVALID_PARAMS, f"{self.method} needs params.taskId", status=400)
        tool = self.gateway.tasks.tool_for(self.owner, self.server, task_id)
        if tool is None:
            raise RpcProblem(FORBIDDEN, f"task {task_id[:64]!r} was not started through ztai by this caller")
        if self.method != "tasks/result":
            return await self.forward(None)

        async def observe(message: Message) -> Message:
            return await self.observe_result(tool, message, task_augmented=False)

        return await self.forward(observe)

    # Rewriting answers -----------------------------------------------------------------------------------
    async def visible_tools(self, message: Message) -> Message:
        """tools/list: the guard learns every tool; the caller sees the granted ones."""
        result = message.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
            return message
        tools = [tool for tool in result["tools"] if isinstance(tool, dict)]
        self.guard.learn_tools(self.server, tools)
        result["tools"] = self.guard.visible_tools(self.principal, self.server, tools)
        if "cacheScope" in result:
            result["cacheScope"] = "private"  # the list now depends on who asked
        return message

    async def without_refused_capabilities(self, message: Message) -> Message:
        """initialize / server/discover: drop capabilities of families never relayed."""
        result = message.get("result")
        capabilities = result.get("capabilities") if isinstance(result, dict) else None
        if isinstance(capabilities, dict):
            for family in REFUSED_CAPABILITIES:
                capabilities.pop(family, None)
        return message

    async def observe_result(self, tool: str, message: Message, *, task_augmented: bool) -> Message:
        """Feed a tool result's text to the guard (session taint, provenance); the result is unchanged."""
        result, error = message.get("result"), message.get("error")
        text = ""
        if isinstance(result, dict):
            if result.get("resultType") == "input_required" and result.get("inputRequests"):
                return rpc_error(
                    self.request_id,
                    METHOD_NOT_FOUND,
                    f"MCP server {self.server} asked the client for input (elicitation or sampling), "
                    "which ztai does not relay",
                )
            started = result.get("task")
            if task_augmented and isinstance(started, dict) and isinstance(started.get("taskId"), str):
                self.gateway.tasks.remember(self.owner, self.server, started["taskId"][:MAX_ID_LENGTH], tool)
                return message
            text = result_text(result)
        elif isinstance(error, dict):
            text = str(error.get("message", ""))
        if text:
            await self.guard.observe(
                self.principal, server=self.server, tool=tool, content=text, route=self.request.url.path
            )
        return message

    async def rewritten(self, message: Message, rewrite: Rewrite | None) -> Message:
        """The answer after `rewrite`; a failure (e.g. the audit is down) becomes a JSON-RPC error."""
        if rewrite is None:
            return message
        try:
            return await rewrite(message)
        except ZtaiError as error:
            problem = problem_of(error)
            return rpc_error(self.request_id, problem.rpc_code, problem.message, problem.data)

    # Forwarding ------------------------------------------------------------------------------------------
    def outgoing_headers(self) -> dict[str, str]:
        """The client's transport headers for upstream, its session id unbound."""
        headers = forwarded_headers(self.request.headers)
        headers["content-type"] = "application/json"
        headers.setdefault("accept", "application/json, text/event-stream")
        session = self.request.headers.get("mcp-session-id")
        if session is not None:
            headers["mcp-session-id"] = self.upstream_session(session)
        return headers

    async def forward(self, rewrite: Rewrite | None) -> Response:
        """Send the message upstream and answer in the form the server chose (JSON or SSE)."""
        response = await self.gateway.upstreams.send(self.upstream, "POST", self.headers, self.body)
        handed_over = False
        try:
            headers = self.session_header(response)
            if response.status == 202 or (self.request_id is None and 200 <= response.status < 300):
                return Response(status_code=202, headers=headers)
            if not 200 <= response.status < 300:
                return await self.upstream_refusal(response, headers)
            content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if content_type == "application/json":
                answer = self.answer_in(parse_upstream_json(await read_bounded(response, self.upstream)))
                return JSONResponse(await self.rewritten(answer, rewrite), headers=headers)
            if content_type == "text/event-stream":
                handed_over = True
                headers["cache-control"] = "no-cache"
                return StreamingResponse(
                    self.relay_events(response, rewrite), media_type="text/event-stream", headers=headers
                )
            raise RpcProblem(
                UPSTREAM_FAILED,
                f"MCP server {self.server} answered with content type {content_type or 'none'}",
                status=502,
            )
        finally:
            if not handed_over:
                response.release()

    async def relay_events(
        self, response: aiohttp.ClientResponse, rewrite: Rewrite | None
    ) -> AsyncIterator[bytes]:
        """Relay an SSE answer: notifications as they come, the response rewritten, server requests not."""
        answered = False
        try:
            async with aclosing(sse_events(response, self.upstream)) as events:
                async for event in events:
                    message = json_object(event.data)
                    if message is None:
                        if not event.data.strip():
                            yield encode_sse(event)  # a priming event (id / retry for resumption)
                        continue
                    if "method" not in message and message.get("id") == self.request_id:
                        answer = await self.rewritten(self.answer_in(message), rewrite)
                        yield encode_sse(SseEvent(orjson.dumps(answer).decode(), event.event, event.id))
                        answered = True
                        break
                    if "method" in message and "id" in message:
                        self.refuse_server_request(message)
                    elif "method" in message:
                        yield encode_sse(event)  # a notification (progress, log message)
        except ZtaiError as error:
            problem = problem_of(error)
            failed = rpc_error(self.request_id, problem.rpc_code, problem.message)
            yield encode_sse(SseEvent(orjson.dumps(failed).decode()))
            answered = True
        finally:
            response.release()
        if not answered:
            ended = rpc_error(
                self.request_id, UPSTREAM_FAILED, f"MCP server {self.server} ended without answering"
            )
            yield encode_sse(SseEvent(orjson.dumps(ended).decode()))

    def answer_in(self, value: Any) -> Message:
        """The response to this request out of an upstream answer (one message, or a legacy batch)."""
        candidates = value if isinstance(value, list) else [value]
        for candidate in candidates:
            if (
                isinstance(candidate, dict)
                and "method" not in candidate
                and candidate.get("id") == self.request_id
                and ("result" in candidate or "error" in candidate)
            ):
                return candidate
        raise RpcProblem(
            UPSTREAM_FAILED,
            f"MCP server {self.server} did not answer request {self.request_id!r}",
            status=502,
        )

    def refuse_server_request(self, message: Message) -> None:
        """Answer a server's sampling / elicitation / roots request upstream with an error; not relayed."""
        method = str(message.get("method", ""))[:MAX_METHOD_LENGTH]
        refusal = rpc_error(
            message["id"], METHOD_NOT_FOUND, f"ztai does not relay {method} requests to clients"
        )
        headers = {k: v for k, v in self.headers.items() if k not in ("mcp-method", "mcp-name")}
        headers = {k: v for k, v in headers.items() if not k.startswith("mcp-param-")}
        self.gateway.in_background(self._post_quietly(headers, orjson.dumps(refusal)))

    async def _post_quietly(self, headers: dict[str, str], body: bytes) -> None:
        try:
            response = await self.gateway.upstreams.send(self.upstream, "POST", headers, body)
            response.release()
        except ZtaiError as error:
            log.warning("refusing a request of MCP server %s failed: %s", self.server, error.message)

    async def upstream_refusal(self, response: aiohttp.ClientResponse, headers: dict[str, str]) -> Response:
        """A non-2xx upstream answer. 404 (session gone) and other 4xx pass with their JSON-RPC error;
        401/403 (ztai's credential refused) and 5xx are ztai's failure to the client: 502."""
        status = response.status
        if status in (401, 403) or status >= 500 or status < 400:
            raise RpcProblem(UPSTREAM_FAILED, f"MCP server {self.server} answered HTTP {status}", status=502)
        body = await read_bounded(response, self.upstream)
        error = json_object(body.decode("utf-8", errors="replace"))
        if error is not None and isinstance(error.get("error"), dict):
            answer = {"jsonrpc": "2.0", "id": self.request_id, "error": error["error"]}
        else:
            answer = rpc_error(
                self.request_id, INVALID_REQUEST, f"MCP server {self.server} answered HTTP {status}"
            )
        return JSONResponse(answer, status_code=status, headers=headers)

    async def end_session(self) -> Response:
        """DELETE: end the caller's upstream session."""
        session = self.request.headers.get("mcp-session-id")
        if session is None:
            return JSONResponse(
                rpc_error(None, INVALID_REQUEST, "DELETE needs an Mcp-Session-Id"), status_code=400
            )
        try:
            headers = self.outgoing_headers()
        except RpcProblem as problem:
            return self.problem_response(problem)
        headers.pop("content-type", None)
        try:
            response = await self.gateway.upstreams.send(self.upstream, "DELETE", headers)
        except ZtaiError as error:
            return self.problem_response(problem_of(error))
        status = response.status
        response.release()
        metrics.MCP_MESSAGES.labels(self.server, "session/delete", "forwarded").inc()
        if status in (200, 202, 204, 404, 405):
            return Response(status_code=status)
        return self.problem_response(
            RpcProblem(UPSTREAM_FAILED, f"MCP server {self.server} answered HTTP {status}", status=502)
        )

    # Sessions ----------------------------------------------------------------------------------------------
    def session_mac(self, session: str) -> str:
        """A MAC binding an upstream session id to this caller and server."""
        material = "\0".join((self.owner, self.server, session)).encode()
        return hmac.new(self.gateway.session_key, material, hashlib.sha256).hexdigest()[:32]

    def session_header(self, response: aiohttp.ClientResponse) -> dict[str, str]:
        """The upstream's session id for the client, bound to the caller."""
        session = response.headers.get("mcp-session-id")
        if session is None:
            return {}
        if not _SESSION_ID.fullmatch(session):
            raise RpcProblem(
                UPSTREAM_FAILED, f"MCP server {self.server} sent a malformed session id", status=502
            )
        return {"mcp-session-id": f"{session}.{self.session_mac(session)}"}

    def upstream_session(self, value: str) -> str:
        """The upstream session id inside a client's bound one; anything else is an unknown session."""
        session, _, mac = value.rpartition(".")
        if not session or not hmac.compare_digest(mac.encode(), self.session_mac(session).encode()):
            raise RpcProblem(INVALID_REQUEST, "unknown MCP session: initialize a new one", status=404)
        return session

    # Answers -----------------------------------------------------------------------------------------------
    @property
    def client_ip(self) -> str:
        return self.request.client.host if self.request.client else ""

    def method_label(self) -> str:
        """The method as a metrics label (a bounded set)."""
        method = self.method
        if method.startswith("notifications/"):
            return "notifications"
        return method if method in _METRIC_METHODS else "other"

    def problem_response(self, problem: RpcProblem) -> Response:
        """A JSON-RPC error for this request with its HTTP status."""
        return JSONResponse(
            rpc_error(self.request_id, problem.rpc_code, problem.message, problem.data), problem.status
        )


ROUTES: list[BaseRoute] = [Route("/{server}", mcp_endpoint, methods=["POST", "GET", "DELETE"])]  # at /mcp

__all__ = ["ROUTES", "McpGateway", "mcp_endpoint"]
