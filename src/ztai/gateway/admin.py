"""Admission for the admin API: an authenticated principal that Cedar lets perform `admin` on an area.

Every admin request is decided by policy (action `admin`, resource `AdminApi::"<area>"`) and the
decision is audited before the operation runs, like any other request.
"""

from __future__ import annotations

from starlette.requests import Request

from ztai.gateway.pipeline import Call, admit, decide_call, enforce, parse_json_object, start_recording
from ztai.gateway.runtime import Runtime


async def admit_admin(runtime: Runtime, request: Request, area: str) -> Call:
    """Authenticate, decide `admin` on AdminApi::<area>, make the decision durable, raise unless allowed.

    Returns the call (its `payload` holds the JSON body, when there is one)."""
    body, principal = await admit(runtime.identity, runtime.settings.server, request)
    call = Call(route=request.url.path, action="admin", resource_type="AdminApi", resource_id=area, body=body)
    call.principal = principal
    if body:
        call.payload = parse_json_object(body, runtime.settings.server.max_json_depth)
    decide_call(runtime, request, call)
    await start_recording(runtime, call)
    enforce(call)
    return call
