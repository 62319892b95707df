"""Policy-as-code with Cedar: schema, policy store, evaluation, explanation, one decision path
(`Decider`), what-if replay of recorded decisions, and policy tests."""

from ztai.policy.context import (
    default_context,
    merge_context,
    model_entities,
    principal_context,
    principal_request,
    token_context,
)
from ztai.policy.decider import Decider, DecisionRequest, Entity, principal_entity
from ztai.policy.decision import Decision, Effect
from ztai.policy.engine import PolicyEngine, Request, load_bundle

__all__ = [
    "Decider",
    "Decision",
    "DecisionRequest",
    "Effect",
    "Entity",
    "PolicyEngine",
    "Request",
    "default_context",
    "load_bundle",
    "merge_context",
    "model_entities",
    "principal_context",
    "principal_entity",
    "principal_request",
    "token_context",
]
