"""The one tree of typed errors. Each carries the HTTP status, the OpenAI-style error type and a stable code.

Libraries raise them without knowing about HTTP; the gateway maps them to responses once per protocol
(`ztai.gateway.responses`: OpenAI JSON on `/v1` and the admin routes, RFC 6749 on `/oauth`, JSON-RPC on
`/mcp`), each mounted part of the app with its own exception handler.

    ZtaiError                        500 server_error      internal_error
    ├── ConfigError                  500                   invalid_config
    ├── PolicyError                  500                   invalid_policy (policies or schema do not load)
    ├── CheckpointError              500                   checkpoint_failed (stored audit state inconsistent)
    ├── ServerRunning                500                   (another `ztai serve` holds the pid-file lock)
    ├── StalePidFile                 500                   (the pid file names no live ztai server)
    ├── ClientDisconnected           499                   client_closed (not a failure: nothing is logged)
    ├── AuthenticationError          401 authentication_error  invalid_token, missing_token, ...
    ├── PermissionDenied             403 permission_error  denied (carries the decision id)
    │   ├── StepUpRequired                                 step_up_required
    │   └── ApprovalRequired                               approval_required (carries the approval id)
    ├── SelfApproval                 403 permission_error  self_approval
    ├── NotFound                     404 invalid_request_error  not_found
    ├── Conflict                     409 invalid_request_error  conflict
    ├── PayloadTooLarge              413 invalid_request_error  request_too_large
    ├── MalformedRequest             422 invalid_request_error  invalid_request
    ├── GrantError                   400 invalid_request_error  invalid_scope
    ├── ExchangeError                400 invalid_request_error  the RFC 6749 / 8693 / 9396 error code
    ├── RpcProblem                   its own status        jsonrpc (carries the JSON-RPC error code)
    ├── UpstreamError                502 upstream_error    upstream_failed
    │   ├── UpstreamTimeout          504                   upstream_timeout
    │   ├── UpstreamResponseTooLarge 502                   upstream_response_too_large
    │   └── UpstreamResponseInvalid  502                   upstream_response_invalid
    └── Unavailable                  503 server_error      (a dependency is down: fail closed, say so)
        ├── AuditUnavailable                               audit_unavailable
        ├── PolicyEvaluationError                          policy_unavailable
        └── StoreError                                     store_unavailable
            └── SharedStateUnavailable                     shared_state_unavailable
"""

from __future__ import annotations

from typing import Any


class ZtaiError(Exception):
    """Base class: a failure with a message that is safe to show to the caller."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(ZtaiError):
    code = "invalid_config"


class ClientDisconnected(ZtaiError):
    """The client went away before its request was read: not a failure of anyone's, logged at debug
    level and counted as 499 (nginx's "client closed request")."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed"


class AuthenticationError(ZtaiError):
    """The caller could not be authenticated (missing, malformed, expired, revoked token...)."""

    status = 401
    type = "authentication_error"
    code = "invalid_token"


class PermissionDenied(ZtaiError):
    """Policy denied the request. Carries the decision id, never the policy text."""

    status = 403
    type = "permission_error"
    code = "denied"

    def __init__(self, message: str, *, decision_id: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.decision_id = decision_id


class StepUpRequired(PermissionDenied):
    code = "step_up_required"


class ApprovalRequired(PermissionDenied):
    """Policy holds the call for a human decision; the error names the approval to ask for."""

    code = "approval_required"

    def __init__(self, message: str, *, decision_id: str, approval_id: str) -> None:
        super().__init__(message, decision_id=decision_id)
        self.approval_id = approval_id


class NotFound(ZtaiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(ZtaiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class MalformedRequest(ZtaiError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_request"


class Conflict(ZtaiError):
    """The approval cannot be decided: it was decided already or has expired."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class SelfApproval(ZtaiError):
    """The principal whose call is held cannot decide its own approval (separation of duties)."""

    status = 403
    type = "permission_error"
    code = "self_approval"


class GrantError(ZtaiError):
    """A grant request that is malformed or asks for more than the parent grant allows."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_scope"


class ExchangeError(ZtaiError):
    """A refused token exchange: `code` is the RFC 6749 / 8693 / 9396 error, the message its description."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, error: str, description: str, *, decision_id: str = "") -> None:
        super().__init__(description, code=error)
        self.decision_id = decision_id


class RpcProblem(ZtaiError):
    """A JSON-RPC error to answer an MCP message with (before or instead of forwarding it)."""

    type = "invalid_request_error"
    code = "jsonrpc"

    def __init__(
        self, rpc_code: int, message: str, *, status: int = 200, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        self.status = status
        self.data = data


class UpstreamError(ZtaiError):
    status = 502
    type = "upstream_error"
    code = "upstream_failed"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamResponseTooLarge(UpstreamError):
    """An upstream answer (or one of its stream events, or its decompressed body) is over its bound."""

    code = "upstream_response_too_large"


class UpstreamResponseInvalid(UpstreamError):
    """An upstream answer that cannot be inspected (unknown content encoding, not the expected format):
    refused rather than passed on unread."""

    code = "upstream_response_invalid"


class ServerRunning(ZtaiError):
    """Another `ztai serve` holds the data directory's pid-file lock."""


class StalePidFile(ZtaiError):
    """The pid file names no live ztai server (its process is gone, or the pid was reused)."""


class CheckpointError(ZtaiError):
    """An audit checkpoint cannot be written because the stored state is inconsistent (`reason` names
    how: a tampered frontier, a broken chain); the log reports it and stays not ready until mended."""

    code = "checkpoint_failed"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(ZtaiError):
    """A dependency ztai needs to decide or record is down: refuse with 503, never allow."""

    status = 503
    code = "unavailable"


class AuditUnavailable(Unavailable):
    """The audit record could not be made durable: fail closed."""

    code = "audit_unavailable"


class PolicyError(ZtaiError):
    """Policies or schema failed to parse or validate."""

    code = "invalid_policy"


class PolicyEvaluationError(Unavailable):
    code = "policy_unavailable"


class StoreError(Unavailable):
    code = "store_unavailable"


class SharedStateUnavailable(StoreError):
    """Redis (`store.redis_url`) could not be reached or answered an error: refuse (503), never allow."""

    code = "shared_state_unavailable"
