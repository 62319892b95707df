"""The admin API for agent tasks: `POST /admin/tasks/{task_id}/revoke`.

Revoking a task refuses every token of that task and of its sub-tasks (their `task_chain` holds it) on
every replica: durable in the store, applied here at once, published over Redis when configured, and
found by every replica's poll otherwise. Needs Cedar `admin` on `AdminApi::"tasks"` (see admin.cedar).
Only a task ztai issued in the admin's tenant can be revoked (the exchange records each one): any other
id is 404, so another tenant's tasks can neither be touched nor found out about.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.audit.events import identity_event
from ztai.errors import MalformedRequest
from ztai.gateway.admin import admit_admin
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.identity.task_tokens import TASK_ID

MAX_REASON = 500


async def revoke_task(request: Request) -> Response:
    """Revoke a task (and its sub-tasks) in the caller's tenant. Body (optional): {"reason": "..."}."""
    runtime: Runtime = request.app.state.runtime
    call = await admit_admin(runtime, request, "tasks")
    assert call.principal is not None
    task_id = str(request.path_params["task_id"])
    if not TASK_ID.match(task_id):
        raise MalformedRequest("a task id looks like tsk_<hex>")
    reason = call.payload.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise MalformedRequest(f"reason must be a string of at most {MAX_REASON} characters")
    tenant = call.principal.tenant
    identity = runtime.settings.identity
    # Every token of the task expires within the longest lifetime ztai issues: remember it that long.
    expires_at = time.time() + identity.max_ttl_seconds + identity.leeway_seconds
    # A task ztai did not issue in the caller's tenant (another tenant's, or none) is 404, nothing recorded.
    await asyncio.to_thread(
        runtime.identity.revocations.revoke_tenant_task, tenant, task_id, expires_at, reason
    )
    await runtime.audit.writer.record(
        identity_event(
            "task.revoked",
            tenant=tenant,
            principal=f"task:{task_id}",
            details={
                "task": task_id,
                "reason": reason,
                "by": call.principal.spiffe_id,
                "decision_id": call.decision_id,
            },
        )
    )
    return JSONResponse({"task": task_id, "tenant": tenant, "revoked": True, "expires_at": int(expires_at)})


ROUTES = [Route("/admin/tasks/{task_id}/revoke", revoke_task, methods=["POST"])]
