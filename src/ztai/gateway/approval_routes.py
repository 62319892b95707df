"""Admin API for held tool calls: `/admin/approvals` (list, show, approve, deny).

Every request is admitted by Cedar (`admin` on `AdminApi::"approvals"`) and audited; the admin sees and
decides only approvals of their own tenant. Each approve/deny is audited again as `approval.<status>`.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.agents.approvals import LIST_FILTERS, MAX_LIST, approval_event, approval_json
from ztai.errors import MalformedRequest
from ztai.gateway.admin import admit_admin
from ztai.gateway.pipeline import Call
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime

AREA = "approvals"
MAX_NOTE_CHARS = 500


def _tenant(call: Call) -> str:
    assert call.principal is not None  # admit_admin authenticated it
    return call.principal.tenant


async def list_approvals(request: Request) -> Response:
    """GET /admin/approvals?status=pending|approved|denied|used|expired|all&limit=N"""
    runtime: Runtime = request.app.state.runtime
    call = await admit_admin(runtime, request, AREA)
    status = request.query_params.get("status", "pending")
    if status not in LIST_FILTERS:
        raise MalformedRequest(f"status must be one of {', '.join(LIST_FILTERS)}", code="invalid_status")
    limit_text = request.query_params.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST:
        raise MalformedRequest(f"limit must be a number from 1 to {MAX_LIST}", code="invalid_limit")
    rows = await asyncio.to_thread(runtime.approvals.list, _tenant(call), status, int(limit_text))
    return JSONResponse({"object": "list", "data": [approval_json(row) for row in rows]})


async def get_approval(request: Request) -> Response:
    """GET /admin/approvals/{approval_id}"""
    runtime: Runtime = request.app.state.runtime
    call = await admit_admin(runtime, request, AREA)
    approval = await asyncio.to_thread(
        runtime.approvals.get, _tenant(call), request.path_params["approval_id"]
    )
    return JSONResponse(approval_json(approval))


async def approve(request: Request) -> Response:
    """POST /admin/approvals/{approval_id}/approve, optional body {"note": "..."}"""
    return await _decide(request, approve=True)


async def deny(request: Request) -> Response:
    """POST /admin/approvals/{approval_id}/deny, optional body {"note": "..."}"""
    return await _decide(request, approve=False)


async def _decide(request: Request, *, approve: bool) -> Response:
    runtime: Runtime = request.app.state.runtime
    call = await admit_admin(runtime, request, AREA)
    assert call.principal is not None
    note = call.payload.get("note", "")
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
        raise MalformedRequest(f"note must be a string of at most {MAX_NOTE_CHARS} characters")
    by = call.principal.spiffe_id
    approval = await asyncio.to_thread(
        runtime.approvals.decide, _tenant(call), request.path_params["approval_id"], approve, by
    )
    # The admission above is already durable; this records the outcome (503 if it cannot be recorded).
    await runtime.audit.writer.record(approval_event(approval, by=by, note=note, via="api"))
    return JSONResponse(approval_json(approval))


ROUTES = [
    Route("/admin/approvals", list_approvals, methods=["GET"]),
    Route("/admin/approvals/{approval_id}", get_approval, methods=["GET"]),
    Route("/admin/approvals/{approval_id}/approve", approve, methods=["POST"]),
    Route("/admin/approvals/{approval_id}/deny", deny, methods=["POST"]),
]
