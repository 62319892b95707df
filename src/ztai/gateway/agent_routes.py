"""The authorization API for agent frameworks without MCP, bound to the caller's task token.

    POST /v1/agents/authorize  {"server": str, "tool": str, "arguments": {...}, "definition"?: {...}}
        -> 200 {"decision_id", "effect", "reasons", "obligations", "approval_id"}
           (a decision is an answer, not an error: the framework runs the call only when effect is
            allow / allow_with_obligations)
    POST /v1/agents/observe    {"content": str, "source"?: "tool_output"|"document"|"user",
                                "server"?: str, "tool"?: str, "task_token"?: str}
        -> 200 {"observation_id", "trusted", "flagged", "injection_score", "findings", "session", "note"}

Both run the same guard as the MCP gateway (`ztai.agents.guard`). A token that is not a task token gets
decisions too (every call denied: no grant). Labels only tighten: with a task token as bearer,
`source: "user"` is untrusted tool output (`trusted: false` and a `note`). The user's request is
trusted only when the task's subject posts it with its own (non-task) token and names the task by its
task token (`task_token`: verified, and its `sub` must be the bearer); other tokens cannot observe.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.errors import AuthenticationError, MalformedRequest, PermissionDenied
from ztai.gateway.pipeline import admit, failed_authentication, parse_json_object
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.identity.task_tokens import task_claims
from ztai.identity.tokens import Principal

MAX_NAME = 128
SOURCES = ("tool_output", "document", "user")


async def authorize(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    body, principal = await admit(runtime.identity, runtime.settings.server, request)
    payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    server = _name(payload, "server", required=False) or "default"
    tool = _name(payload, "tool", required=True)
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        raise MalformedRequest("'arguments' must be a JSON object")
    definition = payload.get("definition")
    if definition is not None and not isinstance(definition, dict):
        raise MalformedRequest("'definition' must be an MCP tool object")
    decision = await runtime.agents.authorize(
        principal,
        server,
        tool,
        arguments,
        route="/v1/agents/authorize",
        ip=request.client.host if request.client else "",
        definition=definition,
    )
    return JSONResponse(decision.to_json(), headers={"x-ztai-decision-id": decision.id})


async def observe(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    body, principal = await admit(runtime.identity, runtime.settings.server, request)
    payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    content = payload.get("content")
    if not isinstance(content, str):
        raise MalformedRequest("'content' must be a string (the tool result or document text)")
    source = payload.get("source", "tool_output")
    if source not in SOURCES:
        raise MalformedRequest(f"'source' must be one of {', '.join(SOURCES)}")
    route = "/v1/agents/observe"
    server, tool = _name(payload, "server", required=False), _name(payload, "tool", required=False)
    if task_claims(principal, runtime.settings.issuer) is not None:
        if "task_token" in payload:
            raise MalformedRequest("'task_token' goes with the task subject's own token, not a task token")
        observation = await runtime.agents.observe(
            principal, server=server, tool=tool, content=content, route=route, source=source
        )
        return JSONResponse(observation.to_json())
    task_principal = await _subjects_task(runtime, request, principal, payload.get("task_token"))
    if source == "user":
        observation = await runtime.agents.observe_user_request(
            task_principal, content, route=route, by=principal.spiffe_id
        )
    else:
        observation = await runtime.agents.observe(
            task_principal, server=server, tool=tool, content=content, route=route, source=source
        )
    return JSONResponse(observation.to_json())


async def _subjects_task(
    runtime: Runtime, request: Request, principal: Principal, task_token: object
) -> Principal:
    """The task (its verified task token) that `principal`, its subject, posts to; else 403."""
    if not isinstance(task_token, str) or not task_token:
        raise PermissionDenied(
            "observe needs a task token: as the bearer (an agent's, from token exchange at /oauth/token), "
            "or the task subject's own token with the task's token as 'task_token'",
            decision_id="",
            code="task_token_required",
        )
    if len(task_token) > runtime.settings.identity.max_token_bytes:
        raise MalformedRequest("'task_token' is larger than identity.max_token_bytes")
    try:
        task_principal = await runtime.identity.verifier.verify_async(task_token)
    except AuthenticationError as exc:
        failed_authentication(runtime.identity, request)(exc, task_token)
        raise PermissionDenied(
            f"task_token: {exc.message}", decision_id="", code="invalid_task_token"
        ) from None
    try:
        task = task_claims(task_principal, runtime.settings.issuer)
    except AuthenticationError as exc:
        raise PermissionDenied(
            f"task_token: {exc.message}", decision_id="", code="invalid_task_token"
        ) from None
    if task is None:
        raise PermissionDenied("task_token is not a task token", decision_id="", code="invalid_task_token")
    if task_principal.tenant != principal.tenant or task.subject != principal.spiffe_id:
        raise PermissionDenied(
            "only the task's subject may post to its session with its own token",
            decision_id="",
            code="not_task_subject",
        )
    return task_principal


def _name(payload: dict[str, Any], key: str, *, required: bool) -> str:
    value = payload.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_NAME or (required and not value):
        raise MalformedRequest(f"'{key}' must be a non-empty string of at most {MAX_NAME} characters")
    return value


ROUTES = [
    Route("/v1/agents/authorize", authorize, methods=["POST"]),
    Route("/v1/agents/observe", observe, methods=["POST"]),
]
