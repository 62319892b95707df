"""Policy-as-code with Cedar: schema, policy store, evaluation, explanation and policy tests."""

from ztai.policy.context import (
    default_context,
    merge_context,
    model_entities,
    principal_context,
    principal_request,
    token_context,
)
from ztai.policy.engine import Decision, PolicyEngine, Request, load_bundle

__all__ = [
    "Decision",
    "PolicyEngine",
    "Request",
    "default_context",
    "load_bundle",
    "merge_context",
    "model_entities",
    "principal_context",
    "principal_request",
    "token_context",
]
