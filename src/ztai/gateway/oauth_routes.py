"""`POST /oauth/token`: RFC 8693 token exchange, turning a subject's token and an agent's token into a
task token (`ztai.identity.exchange` does the work; this module is the HTTP face and the policy check).

The policy decision (Cedar `token.exchange`: principal the subject, resource the actor) is recorded like
every decision and is durable before the answer; so is the `token.issued` event of the new token.
Errors are RFC 6749 §5.2 JSON (`{"error", "error_description"}`), never cached (`Cache-Control: no-store`).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ztai.audit.events import identity_event
from ztai.errors import ExchangeError
from ztai.gateway.pipeline import (
    Call,
    collect_context,
    decide,
    failed_authentication,
    read_body,
    start_recording,
)
from ztai.gateway.responses import NO_STORE, JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.identity.exchange import ExchangePlan, ExchangeRequest, TokenExchange
from ztai.policy import Decision

FORM_TYPE = "application/x-www-form-urlencoded"


async def token_endpoint(request: Request) -> Response:
    """The OAuth token endpoint (only the token-exchange grant); errors are RFC 6749 JSON (the `/oauth`
    mount's handler, `ztai.gateway.responses.oauth_error_response`)."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != FORM_TYPE:
        raise ExchangeError("invalid_request", f"the request body must be {FORM_TYPE}")
    body = await read_body(request, settings.server.max_body_bytes)
    exchange_request = ExchangeRequest.from_form(body, max_token_bytes=settings.identity.max_token_bytes)
    exchange = TokenExchange(settings, runtime.identity.keys, runtime.identity.verifier)
    parties = await exchange.parties_async(exchange_request, failed_authentication(runtime.identity, request))
    call = Call(request.url.path, "token.exchange", "Agent", parties.actor.spiffe_id, body=body)
    call.principal = parties.subject
    recording: asyncio.Task[None] | None = None

    def authorize(plan: ExchangePlan) -> Decision:
        """Cedar `token.exchange` with the pipeline's context plus what the exchange asks for."""
        nonlocal recording
        call.resource_type = plan.resource_type
        call.context = collect_context(call, request)
        call.context.update(plan.policy_context())
        decision = decide(runtime, call)
        recording = start_recording(runtime, call)
        return decision

    try:
        issued = exchange.exchange(exchange_request, parties, authorize)
    finally:
        if recording is not None:
            await recording  # the decision is durable before any answer, allow or deny
    await asyncio.to_thread(
        runtime.identity.revocations.record_task,
        issued.token.tenant,
        issued.task.task_id,
        issued.token.expires_at,
    )
    details = {**issued.audit_details(), "by": "exchange", "route": call.route}
    await runtime.audit.writer.record(
        identity_event(
            "token.issued", tenant=issued.token.tenant, principal=issued.token.subject, details=details
        )
    )
    return JSONResponse(issued.response(), headers=NO_STORE)


ROUTES: list[BaseRoute] = [Route("/token", token_endpoint, methods=["POST"])]  # mounted at /oauth
