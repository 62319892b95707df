"""Typed errors. Each carries the HTTP status, the OpenAI-style error type and a stable code.

The gateway maps them to responses in one place (`ztai.gateway.responses`); libraries raise them
without knowing about HTTP.
"""

from __future__ import annotations


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


class AuditUnavailable(ZtaiError):
    """The audit record could not be made durable: fail closed."""

    status = 503
    type = "server_error"
    code = "audit_unavailable"


class PolicyError(ZtaiError):
    """Policies or schema failed to parse or validate."""

    code = "invalid_policy"


class PolicyEvaluationError(ZtaiError):
    status = 503
    code = "policy_unavailable"


class StoreError(ZtaiError):
    status = 503
    code = "store_unavailable"


class SharedStateUnavailable(StoreError):
    """Redis (`store.redis_url`) could not be reached or answered an error: refuse (503), never allow."""

    code = "shared_state_unavailable"
