"""The authorization API for agent frameworks without MCP, bound to the caller's task token.

    POST /v1/agents/authorize  {"server": str, "tool": str, "arguments": {...}, "definition"?: {...}}
        -> 200 {"decision_id", "effect", "reasons", "obligations", "approval_id"}
           (a decision is an answer, not an error: the framework runs the call only when effect is
            allow / allow_with_obligations)
    POST /v1/agents/observe    {"content": str, "source"?: "tool_output"|"document"|"user",
                                "server"?: str, "tool"?: str}
        -> 200 {"observation_id", "trusted", "flagged", "injection_score", "findings", "session"}

Both run the same guard as the MCP gateway (`ztai.agents.guard`). A token that is not a task token gets
decisions too (every call denied: no grant) and observations are refused (there is no session to feed).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.errors import MalformedRequest, PermissionDenied
from ztai.gateway.pipeline import admit, parse_json_object
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.identity.task_tokens import task_claims

MAX_NAME = 128
SOURCES = ("tool_output", "document", "user")


async def authorize(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    body, principal = await admit(runtime, request)
    payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    server = _name(payload, "server", required=False) or "default"
    tool = _name(payload, "tool", required=True)
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        raise MalformedRequest("'arguments' must be a JSON object")
    definition = payload.get("definition")
    if definition is not None and not isinstance(definition, dict):
        raise MalformedRequest("'definition' must be an MCP tool object")
    assert runtime.agents is not None
    decision = await runtime.agents.authorize(
        principal,
        server,
        tool,
        arguments,
        route="/v1/agents/authorize",
        ip=request.client.host if request.client else "",
        definition=definition,
    )
    return JSONResponse(decision.to_json(), headers={"x-ztai-decision-id": decision.decision_id})


async def observe(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    body, principal = await admit(runtime, request)
    payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    content = payload.get("content")
    if not isinstance(content, str):
        raise MalformedRequest("'content' must be a string (the tool result or document text)")
    source = payload.get("source", "tool_output")
    if source not in SOURCES:
        raise MalformedRequest(f"'source' must be one of {', '.join(SOURCES)}")
    if task_claims(principal, runtime.settings.issuer) is None:
        raise PermissionDenied(
            "observe needs a task token (from token exchange at /oauth/token)",
            decision_id="",
            code="task_token_required",
        )
    assert runtime.agents is not None
    observation = await runtime.agents.observe(
        principal,
        server=_name(payload, "server", required=False),
        tool=_name(payload, "tool", required=False),
        content=content,
        route="/v1/agents/observe",
        source=source,
    )
    return JSONResponse(observation.to_json())


def _name(payload: dict[str, Any], key: str, *, required: bool) -> str:
    value = payload.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_NAME or (required and not value):
        raise MalformedRequest(f"'{key}' must be a non-empty string of at most {MAX_NAME} characters")
    return value


ROUTES = [
    Route("/v1/agents/authorize", authorize, methods=["POST"]),
    Route("/v1/agents/observe", observe, methods=["POST"]),
]
