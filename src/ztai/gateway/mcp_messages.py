"""The JSON-RPC side of the MCP gateway: reading one client message, checking the 2026 routing headers
against it, the text of a tool result, and the errors ztai answers with.

Error codes (JSON-RPC's own, its server-defined range, and the MCP SDKs' where one exists):

| code   | meaning                                                    | HTTP |
| ------ | ---------------------------------------------------------- | ---- |
| -32003 | forbidden: the call is outside the task's grant or denied by policy; an unknown task | 200 |
| -32004 | approval required: the message names the approval id       | 200  |
| -32005 | step-up authentication required                            | 200  |
| -32601 | method not relayed by ztai                                 | 200  |
| -32600 / -32700 / -32602 | invalid request / parse error / invalid params | 400  |
| -32020 | an `Mcp-Method` / `Mcp-Name` header disagrees with the body (MCP's HEADER_MISMATCH) | 400 |
| -32010 | the MCP server failed or answered too much                 | 502  |
| -32603 | ztai could not decide or record (audit, policy or store unavailable) | 503 |
| -32001 | the MCP server timed out                                   | 504  |
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.datastructures import Headers

from ztai.errors import (
    ApprovalRequired,
    PermissionDenied,
    RpcProblem,
    UpstreamError,
    UpstreamTimeout,
    ZtaiError,
)
from ztai.gateway.bounds import nests_deeper

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
REQUEST_TIMEOUT = -32001
FORBIDDEN = -32003
APPROVAL_REQUIRED = -32004
STEP_UP_REQUIRED = -32005
UPSTREAM_FAILED = -32010
HEADER_MISMATCH = -32020

EFFECT_CODES = {"require_approval": APPROVAL_REQUIRED, "step_up": STEP_UP_REQUIRED}
_ERROR_EFFECTS = {"approval_required": "require_approval", "step_up_required": "step_up"}
MAX_METHOD_LENGTH = 128
MAX_ID_LENGTH = 256
MAX_JSON_DEPTH = 64

Message = dict[str, Any]


def parse_message(body: bytes, max_depth: int) -> Message:
    """One JSON-RPC 2.0 message (request, notification or response), bounded in depth."""
    if body.lstrip()[:1] == b"[":
        raise RpcProblem(
            INVALID_REQUEST, "JSON-RPC batches are not supported: send one message per request", status=400
        )
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RpcProblem(
            PARSE_ERROR, f"body is not valid JSON: {exc.msg} at position {exc.pos}", status=400
        ) from None
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise RpcProblem(INVALID_REQUEST, "body must be one JSON-RPC 2.0 message object", status=400)
    if nests_deeper(message, max_depth):
        raise RpcProblem(INVALID_REQUEST, f"message nests deeper than {max_depth} levels", status=400)
    method = message.get("method")
    if "method" in message and (not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_LENGTH):
        raise RpcProblem(INVALID_REQUEST, "method must be a short string", status=400)
    if "id" in message:
        request_id = message["id"]
        valid = isinstance(request_id, int) and not isinstance(request_id, bool)
        if not valid and not (isinstance(request_id, str) and len(request_id) <= MAX_ID_LENGTH):
            raise RpcProblem(INVALID_REQUEST, "id must be a string or an integer", status=400)
    if "params" in message and not isinstance(message["params"], dict):
        raise RpcProblem(INVALID_PARAMS, "params must be an object", status=400)
    return message


def check_routing_headers(headers: Headers, message: Message) -> None:
    """The 2026 routing headers must say what the body says: a server (or anything between) that routes
    on a header must not run something other than what ztai decided on."""
    for name in ("mcp-method", "mcp-name", "mcp-protocol-version"):
        if len(headers.getlist(name)) > 1:
            raise RpcProblem(HEADER_MISMATCH, f"{name} header appears more than once", status=400)
    method_header = headers.get("mcp-method")
    if method_header is not None and method_header != message.get("method"):
        raise RpcProblem(HEADER_MISMATCH, "Mcp-Method header does not match the body's method", status=400)
    name_header = headers.get("mcp-name")
    if name_header is not None and message.get("method") == "tools/call":
        params = message.get("params") or {}
        if decode_header_value(name_header) != params.get("name"):
            raise RpcProblem(
                HEADER_MISMATCH, "Mcp-Name header does not match the body's tool name", status=400
            )


def decode_header_value(value: str) -> str | None:
    """An MCP header value: plain visible ASCII, or `=?base64?<utf-8 as base64>?=` (None if malformed)."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


def result_text(result: Mapping[str, Any]) -> str:
    """All text a tool result carries: text parts, embedded text resources, and any string of its
    structured content that the text parts do not already hold."""
    parts: list[str] = []
    content = result.get("content")
    for item in content if isinstance(content, list) else []:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("text"), str):
            parts.append(item["text"])
        resource = item.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("text"), str):
            parts.append(resource["text"])
    # Strings the text parts already carry (the SDKs put structured content there as JSON) count once.
    known = set(parts)
    for part in parts:
        if part.lstrip()[:1] in ("{", "["):
            known.update(_strings(_json_value(part), 0))
    extra = [s for s in _strings(result.get("structuredContent"), 0) if s not in known]
    return "\n".join([*parts, *extra])


def rpc_error(request_id: Any, code: int, message: str, data: dict[str, Any] | None = None) -> Message:
    """A JSON-RPC error response (`data` only when given)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def problem_of(error: ZtaiError) -> RpcProblem:
    """A typed error as a JSON-RPC error, keeping its HTTP status: the one JSON-RPC mapping."""
    if isinstance(error, RpcProblem):
        return error
    if isinstance(error, PermissionDenied):
        effect = _ERROR_EFFECTS.get(error.code, "deny")
        approval_id = error.approval_id if isinstance(error, ApprovalRequired) else None
        data: dict[str, Any] = {
            "decision_id": error.decision_id,
            "effect": effect,
            "reasons": [],
            "approval_id": approval_id,
        }
        return RpcProblem(EFFECT_CODES.get(effect, FORBIDDEN), error.message, data=data)
    if isinstance(error, UpstreamTimeout):
        code = REQUEST_TIMEOUT
    elif isinstance(error, UpstreamError):
        code = UPSTREAM_FAILED
    else:  # ztai could not decide or record (audit, policy, store unavailable), or a bad request
        code = INTERNAL_ERROR if error.status >= 500 else INVALID_REQUEST
    return RpcProblem(code, error.message, status=error.status)


def parse_upstream_json(body: bytes) -> Any:
    """An upstream answer's JSON body; invalid JSON is the server's failure (502)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RpcProblem(UPSTREAM_FAILED, "MCP server answered with invalid JSON", status=502) from None


def _json_value(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def json_object(text: str) -> Message | None:
    """The JSON object in `text`, or None when it is not one."""
    value = _json_value(text)
    return value if isinstance(value, dict) else None


def _strings(value: Any, depth: int) -> list[str]:
    if depth > MAX_JSON_DEPTH:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item, depth + 1)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item, depth + 1)]
    return []
