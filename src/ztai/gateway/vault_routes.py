"""`DELETE /v1/vault/sessions/{session}`: the caller ends one of its own session vaults.

A chat app calls it when a conversation ends, so the values tokenized in that session are gone at once
rather than at the vault's expiry. The vault is the caller's by construction (its id is keyed by the
caller's identity), so no one can end another principal's session; the call is audited.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.audit.events import identity_event
from ztai.detect.vault import session_name
from ztai.errors import NotFound
from ztai.gateway.pipeline import authenticate
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime


async def forget_session(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    principal = await authenticate(runtime.identity, request)
    session = session_name(str(request.path_params["session"]), None)  # malformed: 400
    assert session is not None
    vaults = runtime.inspection.vaults
    if vaults is None:
        raise NotFound("session vaults are disabled (detect.vault.enabled)")
    scope = vaults.scope(principal, session)
    removed = await asyncio.to_thread(vaults.store.forget, scope)
    await runtime.audit.writer.record(
        identity_event(
            "vault.forgotten",
            tenant=principal.tenant,
            principal=principal.spiffe_id,
            details={"scope": scope.id, "entries": removed, "by": "api"},
        )
    )
    return JSONResponse({"session": session, "forgotten_entries": removed})


ROUTES = [Route("/v1/vault/sessions/{session:path}", forget_session, methods=["DELETE"])]
