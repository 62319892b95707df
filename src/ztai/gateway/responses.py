"""The one place where errors become responses, once per protocol.

- **OpenAI JSON** (`{"error": {"message", "type", "code", "param"}}`) for the OpenAI-compatible API and
  everything else the app serves; also the SSE error event of a stream that fails after it started.
- **RFC 6749 §5.2** (`{"error", "error_description"}`, never cached) for the routes under `/oauth`.
- **JSON-RPC 2.0** for the routes under `/mcp`: `ztai.gateway.mcp_messages.problem_of` turns a typed
  error into its JSON-RPC code; the MCP routes answer with the request's id (an error that escapes them
  is answered here with id null).

`create_app` mounts each protocol's routes with its own exception handlers (Starlette's `Mount` and
`ExceptionMiddleware`), so a route raises `ztai.errors` types and never builds an error body itself.
`ErrorBoundary` turns anything unexpected into one logged line and a 500 in the right shape; a client
that went away (`starlette.requests.ClientDisconnect`) is not an error: it logs no traceback and counts
as 499.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ztai.errors import (
    ApprovalRequired,
    ClientDisconnected,
    ExchangeError,
    PayloadTooLarge,
    PermissionDenied,
    ZtaiError,
)
from ztai.gateway.mcp_messages import problem_of, rpc_error

log = logging.getLogger("ztai.gateway")

Handler = Callable[[Request, Exception], Awaitable[Response]]
NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


# OpenAI ---------------------------------------------------------------------------------------------
def error_body(message: str, type_: str, code: str, **extra: str) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "code": code, "param": None, **extra}}


def openai_error_body(error: ZtaiError) -> dict[str, object]:
    """The OpenAI error object of a typed error (with the decision and approval ids it carries)."""
    extra: dict[str, str] = {}
    if isinstance(error, PermissionDenied):
        extra["decision_id"] = error.decision_id
    if isinstance(error, ApprovalRequired):
        extra["approval_id"] = error.approval_id
    return error_body(error.message, error.type, error.code, **extra)


def error_response(error: ZtaiError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(error, PermissionDenied):
        headers["x-ztai-decision-id"] = error.decision_id
    if error.status == 401:
        headers["www-authenticate"] = 'Bearer realm="ztai"'
    return JSONResponse(openai_error_body(error), status_code=error.status, headers=headers)


def sse_error_event(error: ZtaiError) -> bytes:
    """A stream's failure once its headers are out: an SSE event the OpenAI SDKs raise as an error."""
    return b"data: " + orjson.dumps(openai_error_body(error)) + b"\n\n"


# OAuth (RFC 6749 §5.2) --------------------------------------------------------------------------------
def oauth_error_body(error: ZtaiError) -> dict[str, str]:
    """A refused exchange keeps its RFC 6749 / 8693 / 9396 code; a body over its bound is
    `invalid_request`; a dependency that is down is `temporarily_unavailable`; the rest `server_error`."""
    if isinstance(error, ExchangeError):
        body = {"error": error.code, "error_description": error.message}
        if error.decision_id:
            body["decision_id"] = error.decision_id
        return body
    if isinstance(error, PayloadTooLarge) or 400 <= error.status < 500:
        code = "invalid_request"
    else:
        code = "temporarily_unavailable" if error.status == 503 else "server_error"
    return {"error": code, "error_description": error.message}


def oauth_error_response(error: ZtaiError) -> JSONResponse:
    return JSONResponse(oauth_error_body(error), status_code=error.status, headers=NO_STORE)


# Handlers, per protocol -----------------------------------------------------------------------------
async def handle_ztai_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ZtaiError)
    if isinstance(exc, ClientDisconnected):
        return _client_gone()
    return error_response(exc)


async def handle_oauth_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ZtaiError)
    if isinstance(exc, ClientDisconnected):
        return _client_gone()
    return oauth_error_response(exc)


async def handle_mcp_error(request: Request, exc: Exception) -> Response:
    """An error that escaped the MCP routes' own answers (they know the request id; this does not)."""
    assert isinstance(exc, ZtaiError)
    if isinstance(exc, ClientDisconnected):
        return _client_gone()
    if exc.status == 401:
        return error_response(exc)  # 401 with WWW-Authenticate, as for every route
    problem = problem_of(exc)
    body = rpc_error(None, problem.rpc_code, problem.message, problem.data)
    return JSONResponse(body, status_code=problem.status)


async def handle_client_disconnect(_request: Request, _exc: Exception) -> Response:
    return _client_gone()


def _client_gone() -> Response:
    log.debug("client disconnected before its request was read")
    return Response(status_code=ClientDisconnected.status)


async def handle_not_found(_request: Request, _exc: Exception) -> Response:
    return JSONResponse(error_body("no such route", "invalid_request_error", "not_found"), status_code=404)


async def handle_method_not_allowed(_request: Request, _exc: Exception) -> Response:
    return JSONResponse(
        error_body("method not allowed", "invalid_request_error", "method_not_allowed"), status_code=405
    )


def protocol_handlers(handler: Handler) -> dict[Any, Handler]:
    """The exception handlers of one mounted protocol: its typed errors and a client gone away."""
    return {ZtaiError: handler, ClientDisconnect: handle_client_disconnect}


# Anything unexpected ---------------------------------------------------------------------------------
class ErrorBoundary:
    """The innermost catch-all: an unexpected exception becomes one log line (with its traceback; never
    its message, which may hold data) and a 500 in OpenAI form when nothing was sent yet. It is not
    re-raised, so the server does not log it a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            log.debug("client disconnected")
        except Exception as exc:
            log.exception("unexpected error: %s", type(exc).__name__)
            if not started:
                body = error_body("internal error", "server_error", "internal_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)
