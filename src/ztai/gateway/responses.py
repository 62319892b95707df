"""The one place where errors become HTTP responses (OpenAI-style error JSON)."""

from __future__ import annotations

import logging

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ztai.errors import ApprovalRequired, PermissionDenied, ZtaiError

log = logging.getLogger("ztai.gateway")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


def error_body(message: str, type_: str, code: str, **extra: str) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "code": code, "param": None, **extra}}


def error_response(error: ZtaiError) -> JSONResponse:
    extra: dict[str, str] = {}
    headers: dict[str, str] = {}
    if isinstance(error, PermissionDenied):
        extra["decision_id"] = error.decision_id
        headers["x-ztai-decision-id"] = error.decision_id
    if isinstance(error, ApprovalRequired):
        extra["approval_id"] = error.approval_id
    if error.status == 401:
        headers["www-authenticate"] = 'Bearer realm="ztai"'
    body = error_body(error.message, error.type, error.code, **extra)
    return JSONResponse(body, status_code=error.status, headers=headers)


async def handle_ztai_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ZtaiError)
    return error_response(exc)


async def handle_unexpected(_request: Request, exc: Exception) -> Response:
    # Never a stack trace to the caller; the log has the type (not the message: it may hold data).
    log.exception("unexpected error: %s", type(exc).__name__)
    return JSONResponse(error_body("internal error", "server_error", "internal_error"), status_code=500)


async def handle_not_found(_request: Request, _exc: Exception) -> Response:
    return JSONResponse(error_body("no such route", "invalid_request_error", "not_found"), status_code=404)


async def handle_method_not_allowed(_request: Request, _exc: Exception) -> Response:
    return JSONResponse(
        error_body("method not allowed", "invalid_request_error", "method_not_allowed"), status_code=405
    )
