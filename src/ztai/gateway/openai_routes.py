"""The OpenAI-compatible API: chat completions (incl. streaming), embeddings, models."""

from __future__ import annotations

import time
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ztai.audit.events import identity_event
from ztai.errors import MalformedRequest, UpstreamError, ZtaiError
from ztai.gateway import metrics
from ztai.gateway.pipeline import (
    Call,
    admit,
    authenticate,
    decide_call,
    enforce,
    parse_json_object,
    start_recording,
)
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.gateway.upstream import Upstream, passed_headers, relay
from ztai.policy import default_context, principal_request, token_context

MAX_MODEL_NAME = 256


async def chat_completions(request: Request) -> Response:
    return await _model_call(request, action="chat", path="/chat/completions", required="messages")


async def embeddings(request: Request) -> Response:
    return await _model_call(request, action="embed", path="/embeddings", required="input")


async def _model_call(request: Request, *, action: str, path: str, required: str) -> Response:
    runtime: Runtime = request.app.state.runtime
    body, principal = await admit(runtime, request)
    payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    model = _model_name(payload)
    if required not in payload:
        raise MalformedRequest(f"missing required field {required!r}")
    upstream = runtime.upstreams.for_model(model)  # unknown model: 404 before any decision is needed
    call = Call(path, action, "Model", model, body=body, payload=payload, principal=principal)
    decision = decide_call(runtime, request, call)
    recording = start_recording(runtime, call)
    if not decision.allowed or runtime.settings.audit.commit_before_forward:
        await recording
        enforce(call)
    # Nothing is answered before the decision is durable. If the commit fails, its AuditUnavailable (503)
    # replaces whatever the upstream said: fail closed.
    try:
        response = await _forward(runtime, upstream, path, body, stream=payload.get("stream") is True)
    except ZtaiError:
        await recording
        raise
    try:
        await recording
    except ZtaiError:
        if response.background is not None:  # an opened upstream stream: give its connection back
            await response.background()
        raise
    response.headers["x-ztai-decision-id"] = call.decision_id
    return response


async def _forward(runtime: Runtime, upstream: Upstream, path: str, body: bytes, *, stream: bool) -> Response:
    stage = time.perf_counter()
    try:
        if stream:
            streamed = await runtime.upstreams.open_stream(upstream, path, body)
            metrics.STAGE["upstream"].observe(time.perf_counter() - stage)
            return StreamingResponse(
                relay(streamed),
                status_code=streamed.status,
                headers=passed_headers(streamed),
                background=BackgroundTask(streamed.release),
            )
        result = await runtime.upstreams.post(upstream, path, body)
    except UpstreamError:
        metrics.UPSTREAM_ERRORS.labels(upstream.name).inc()
        raise
    metrics.STAGE["upstream"].observe(time.perf_counter() - stage)
    # Provider-side failures are reported as a bad gateway; client errors (4xx) pass through as they are.
    return Response(
        result.body, status_code=result.status if result.status < 500 else 502, headers=result.headers
    )


def _model_name(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise MalformedRequest("missing required field 'model' (a string)")
    if len(model) > MAX_MODEL_NAME:
        raise MalformedRequest("field 'model' is too long")
    return model


async def list_models(request: Request) -> Response:
    """Only the models the caller may use (each checked against policy as a `chat` request)."""
    runtime: Runtime = request.app.state.runtime
    principal = await authenticate(runtime, request)
    context = default_context()
    context.update(
        tenant=principal.tenant,
        principal_kind=principal.kind,
        token=token_context(principal.claims, principal.issuer),
    )
    names = sorted(runtime.upstreams.by_model)
    requests = [
        principal_request(principal.spiffe_id, principal.kind, "chat", "Model", n, context) for n in names
    ]
    decisions = runtime.policy.decide_many(requests)
    allowed = [name for name, decision in zip(names, decisions, strict=True) if decision.allowed]
    await runtime.audit.record(
        identity_event(
            "models.list",
            tenant=principal.tenant,
            principal=principal.spiffe_id,
            details={"allowed": allowed, "policy_revision": runtime.policy.revision},
        )
    )
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": runtime.upstreams.by_model[name].name}
        for name in allowed
    ]
    return JSONResponse({"object": "list", "data": data})
