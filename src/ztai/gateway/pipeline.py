"""The request path, one explicit sequence of stages:

    admit (read bounded body, authenticate) -> [route parses its payload]
    -> decide (collect context, Cedar) -> record (audit, durable) -> enforce -> [route forwards, responds]

Each stage is a plain function with one job. What a stage learns goes into the `Call`, so the policy sees
all of it and the audit record explains it. Failures raise typed errors (401/403/413/422/503) that the
app maps to responses in one place.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request

from ztai.config import ServerSettings
from ztai.errors import (
    AuthenticationError,
    MalformedRequest,
    PayloadTooLarge,
    PermissionDenied,
    StepUpRequired,
)
from ztai.gateway import metrics
from ztai.gateway.bounds import nests_deeper
from ztai.gateway.runtime import Identity, Runtime
from ztai.identity import Principal
from ztai.policy import Decision, DecisionRequest, Entity, principal_entity
from ztai.policy.context import principal_context

PRINCIPAL_SCOPE_KEY = "ztai.principal"  # the ASGI scope entry naming the authenticated principal


@dataclass
class Call:
    """One request as it moves through the stages."""

    route: str
    action: str
    resource_type: str
    resource_id: str
    body: bytes = b""
    payload: dict[str, Any] = field(default_factory=dict)
    principal: Principal | None = None
    context: dict[str, Any] = field(default_factory=dict)
    asked: DecisionRequest | None = None  # what the Decider was asked (and records)
    decision: Decision | None = None
    content: dict[str, Any] | None = None  # context.content from the detectors, when they ran
    findings: list[dict[str, Any]] = field(default_factory=list)  # for the audit record (no values)

    @property
    def decision_id(self) -> str:
        return self.decision.id if self.decision is not None else ""


# Stage 1: read and bound the input --------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    if not body:
        raise MalformedRequest("request body is empty; expected a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(payload, dict):
        raise MalformedRequest("request body must be a JSON object")
    if nests_deeper(payload, max_depth):
        raise MalformedRequest(f"request body nests deeper than {max_depth} levels")
    return payload


# Stage 2: authenticate -----------------------------------------------------------------------------
def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationError(
            "missing bearer token (Authorization: Bearer <ztai token>)", code="missing_token"
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Authorization header must be 'Bearer <token>'", code="malformed_token")
    return token.strip()


async def authenticate(identity: Identity, request: Request) -> Principal:
    """The verified principal of the bearer token; a failure is audited (rate-limited) and raised (401)."""
    token: str | None = None
    try:
        token = bearer_token(request)
        principal = await identity.verifier.verify_async(token)
    except AuthenticationError as exc:
        failed_authentication(identity, request)(exc, token)
        raise
    request.scope[PRINCIPAL_SCOPE_KEY] = principal.spiffe_id  # for the access log
    return principal


def failed_authentication(
    identity: Identity, request: Request
) -> Callable[[AuthenticationError, str | None], None]:
    """What a route calls when a token presented in `request` fails verification: audit it."""
    route = metrics.route_label(request.scope) or request.url.path
    ip = request.client.host if request.client else ""

    def record(error: AuthenticationError, token: str | None) -> None:
        identity.failures.failed(error, route=route, ip=ip, token=token)

    return record


# Stage 3: collect context --------------------------------------------------------------------------
def collect_context(call: Call, request: Request) -> dict[str, Any]:
    assert call.principal is not None
    principal = call.principal
    context = principal_context(
        principal.tenant,
        principal.kind,
        principal.claims,
        principal.issuer,
        ip=request.client.host if request.client else "",
        route=call.route,
        stream=bool(call.payload.get("stream")),
        size=len(call.body),
    )
    if call.content is not None:
        context["content"] = call.content
    return context


# Stage 4: decide (the Decider validates the context, asks Cedar and names the decision) ---------------
def decision_request(call: Call) -> DecisionRequest:
    """The call as the Decider sees it: who, what, on what, in which context, and what to record."""
    assert call.principal is not None
    principal = call.principal
    return DecisionRequest(
        tenant=principal.tenant,
        principal=principal_entity(principal.spiffe_id, principal.kind),
        action=call.action,
        resource=Entity(call.resource_type, call.resource_id),
        context=call.context,
        route=call.route,
        fingerprint=hashlib.sha256(call.body).hexdigest(),
        details={"jti": principal.jti, "bytes": len(call.body), "ip": call.context["network"]["ip"]},
        findings=call.findings,
    )


def decide(runtime: Runtime, call: Call) -> Decision:
    """Decide `call` in its collected context (no I/O)."""
    stage = time.perf_counter()
    call.asked = decision_request(call)
    call.decision = runtime.decider.evaluate(call.asked)
    metrics.STAGE["decide"].observe(time.perf_counter() - stage)
    metrics.DECISIONS.labels(call.action, call.decision.effect).inc()
    return call.decision


# Stage 5: audit ------------------------------------------------------------------------------------
async def record(runtime: Runtime, call: Call) -> None:
    """Make the decision durable before anything else happens (raises AuditUnavailable: fail closed)."""
    assert call.asked is not None and call.decision is not None
    await runtime.decider.record(call.asked, call.decision)


# The sequence --------------------------------------------------------------------------------------
async def admit(identity: Identity, server: ServerSettings, request: Request) -> tuple[bytes, Principal]:
    """Read the bounded body and authenticate the caller: 413 or 401 before anything else is looked at."""
    stage = time.perf_counter()
    body = await read_body(request, server.max_body_bytes)
    now = time.perf_counter()
    metrics.STAGE["read"].observe(now - stage)
    principal = await authenticate(identity, request)
    metrics.STAGE["authenticate"].observe(time.perf_counter() - now)
    return body, principal


def decide_call(runtime: Runtime, request: Request, call: Call) -> Decision:
    """Collect context and decide `call` (its principal is authenticated). No I/O."""
    call.context = collect_context(call, request)
    return decide(runtime, call)


def start_recording(runtime: Runtime, call: Call) -> asyncio.Task[None]:
    """Start making the decision durable; the caller must `await durable(task)` before responding."""
    return asyncio.ensure_future(_timed_record(runtime, call))


async def _timed_record(runtime: Runtime, call: Call) -> None:
    stage = time.perf_counter()
    await record(runtime, call)
    metrics.STAGE["audit"].observe(time.perf_counter() - stage)


def enforce(call: Call) -> None:
    """Raise 403 (or step-up) unless the decision allows the call."""
    assert call.decision is not None
    if call.decision.effect == "step_up":
        raise StepUpRequired("step-up authentication required for this request", decision_id=call.decision_id)
    if not call.decision.allowed:
        raise PermissionDenied(
            f"{call.action} on {call.resource_id} denied by policy", decision_id=call.decision_id
        )
