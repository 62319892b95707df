"""The admin API for policies: `POST /admin/policy/whatif`, what-if replay of the caller's tenant.

    POST /admin/policy/whatif  {"policies": {"<name>.cedar": "<Cedar text>", ...},
                                "since"?: "<ISO 8601>", "limit"?: N}
        -> 200 {"summary": {...}, "changes": [{"decision_id", "before", "after", "reasons"}, ...]}

The same replay as `ztai policy whatif` (`ztai.policy.whatif`), over the newest `limit` decisions of the
admin's own tenant; nothing is written but the admission's own decision record, which is left out of
the replay. Needs Cedar `admin` on `AdminApi::"policy"`. Input is bounded: the body by
`server.max_body_bytes`, at most `MAX_FILES` files and `MAX_LIMIT` decisions.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ztai.errors import MalformedRequest, PolicyError
from ztai.gateway.admin import admit_admin
from ztai.gateway.responses import JSONResponse
from ztai.gateway.runtime import Runtime
from ztai.policy import model_entities
from ztai.policy.engine import bundle_from_sources
from ztai.policy.whatif import replay

MAX_FILES = 64
MAX_LIMIT = 10_000


async def whatif(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    call = await admit_admin(runtime, request, "policy")
    assert call.principal is not None
    sources = _sources(call.payload.get("policies"))
    since = _since(call.payload.get("since"))
    limit = call.payload.get("limit", MAX_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise MalformedRequest(f"limit must be a number from 1 to {MAX_LIMIT}", code="invalid_limit")
    entities = model_entities((model, up.name) for model, up in runtime.upstreams.by_model.items())
    try:
        candidate = bundle_from_sources(sources, entities)
    except PolicyError as exc:
        raise MalformedRequest(f"candidate policies: {exc.message}", code="invalid_policies") from None
    tenant, admission = call.principal.tenant, call.decision_id

    def replayed() -> dict[str, Any]:
        records = runtime.audit.log.decisions(since=since, limit=limit + 1, tenant=tenant)
        records = [record for record in records if record.get("id") != admission][-limit:]
        report = replay(records, candidate)
        return {"summary": report.summary(), "changes": [change.to_json() for change in report.changes]}

    return JSONResponse(await asyncio.to_thread(replayed))


def _sources(value: object) -> dict[str, str]:
    if (
        not isinstance(value, dict)
        or not 0 < len(value) <= MAX_FILES
        or not all(
            isinstance(k, str) and k.endswith(".cedar") and isinstance(v, str) for k, v in value.items()
        )
    ):
        raise MalformedRequest(
            f"'policies' must map 1 to {MAX_FILES} file names ending in .cedar to Cedar text",
            code="invalid_policies",
        )
    return value


def _since(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise MalformedRequest("'since' must be an ISO 8601 time", code="invalid_since")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


ROUTES = [Route("/admin/policy/whatif", whatif, methods=["POST"])]
