"""One decision path: every route that decides anything asks the `Decider`.

    DecisionRequest (tenant, principal, action, resource, the complete context, what the route adds
    for the record) -> Cedar with the schema (`PolicyEngine`: invalid context => deny) -> refusals
    (found before policy: they deny whatever it says) -> Decision (carrying its id)
    -> one decision record, durable through the audit writer before the caller answers.

The record follows OPA's decision log: decision id, time, tenant, principal, action, resource, the
evaluated input (entities and the context Cedar saw; content as finding types and keyed hashes, a
tool call's arguments withheld), the policy revision (digest of policies and schema) and the schema
revision, the effect, reasons and obligations, and the request's route and fingerprint. Because it holds
what was decided on, history can be decided again with another policy set (`ztai.policy.whatif`).

Steps that follow policy (an approval used, a call budget spent) amend the decision; the record keeps
both what policy said (`policy`) and the outcome (`effect`, `reasons`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ztai.audit.events import new_event_id, now_iso
from ztai.errors import PolicyEvaluationError
from ztai.policy.decision import Decision
from ztai.policy.engine import ENTITY_TYPES, PolicyEngine, Request

Recorder = Callable[[dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Entity:
    """A Cedar entity reference: `Model::"mock"`, `Agent::"spiffe://..."`."""

    type: str
    id: str

    def __str__(self) -> str:
        return f"{self.type}::{self.id}"

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "id": self.id}


def principal_entity(spiffe_id: str, kind: str) -> Entity:
    """The Cedar entity of a principal of `kind` (user, agent, service, model)."""
    return Entity(ENTITY_TYPES.get(kind, "User"), spiffe_id)


@dataclass(frozen=True, slots=True)
class DecisionRequest:
    """principal asks to perform action on resource in context, plus what the record needs.

    `context` is the schema's complete Context (`ztai.policy.context.principal_context` builds it).
    `refusals` are reasons found before policy that deny whatever it says (a tool call outside its task
    grant); `notes` explain the decision without changing it (how a tool was profiled). `details` and
    `findings` are recorded, never evaluated."""

    tenant: str
    principal: Entity
    action: str
    resource: Entity
    context: dict[str, Any]
    route: str = ""
    fingerprint: str = ""  # SHA-256 of the request body, or a keyed hash of a tool call
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)  # content: types and keyed hashes
    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def cedar(self) -> Request:
        p, r = self.principal, self.resource
        return Request(p.type, p.id, self.action, r.type, r.id, self.context)


class Decider:
    """Decides requests with the active policies and writes one decision record for each."""

    def __init__(self, engine: PolicyEngine, record: Recorder | None = None) -> None:
        self.engine = engine
        self._record = record

    @property
    def revision(self) -> str:
        return self.engine.revision

    def evaluate(self, request: DecisionRequest, *, decision_id: str | None = None) -> Decision:
        """The decision, with a new id (none when `decision_id == ""`: an evaluation never recorded).
        No I/O. Raises PolicyEvaluationError when the engine itself fails (fail closed)."""
        try:
            decided = self.engine.decide(request.cedar())
        except Exception as exc:  # the policy engine failing must refuse the request, not allow it
            raise PolicyEvaluationError(f"policy evaluation failed: {type(exc).__name__}") from None
        return conclude(decided, request, new_event_id("dec") if decision_id is None else decision_id)

    def evaluate_many(self, requests: list[DecisionRequest]) -> list[Decision]:
        """Evaluations only (no ids, nothing recorded), in one Cedar batch: e.g. which models to list."""
        try:
            decided = self.engine.decide_many([request.cedar() for request in requests])
        except Exception as exc:  # the policy engine failing must refuse, not allow
            raise PolicyEvaluationError(f"policy evaluation failed: {type(exc).__name__}") from None
        return [conclude(d, request, "") for d, request in zip(decided, requests, strict=True)]

    async def decide(self, request: DecisionRequest) -> Decision:
        """Evaluate and make the decision record durable (raises AuditUnavailable: fail closed)."""
        decision = self.evaluate(request)
        await self.record(request, decision)
        return decision

    async def record(
        self, request: DecisionRequest, decision: Decision, evaluated: Decision | None = None
    ) -> None:
        """Make the record of `decision` durable; `evaluated` is what policy said before later steps
        amended it (default: the same)."""
        if self._record is None:
            raise RuntimeError("this Decider records nothing (built without a recorder)")
        await self._record(self.record_of(request, decision, evaluated))

    def record_of(
        self, request: DecisionRequest, decision: Decision, evaluated: Decision | None = None
    ) -> dict[str, Any]:
        """The decision record (the audit event) of `decision`."""
        said = evaluated or decision
        context = request.context
        withheld = bool(context.get("input"))
        evaluated_input: dict[str, Any] = {
            "principal": request.principal.to_json(),
            "action": request.action,
            "resource": request.resource.to_json(),
            # A tool call's arguments are raw values: recorded only as the call's keyed fingerprint.
            "context": {**context, "input": {}} if withheld else context,
        }
        if withheld:
            evaluated_input["input_withheld"] = True
        if request.refusals:
            evaluated_input["refusals"] = list(request.refusals)
        if request.notes:
            evaluated_input["notes"] = list(request.notes)
        event: dict[str, Any] = {
            "id": decision.id,
            "kind": "decision",
            "time": now_iso(),
            "tenant": request.tenant,
            "principal": request.principal.id,
            "action": request.action,
            "resource": str(request.resource),
            "effect": decision.effect,
            "reasons": decision.reasons,
            "errors": decision.errors,
            "obligations": decision.obligations,
            "policy_revision": decision.policy_revision,
            "schema_revision": self.engine.bundle.schema_revision,
            "policy": {"effect": said.effect, "reasons": said.reasons},
            "input": evaluated_input,
            "request": {"route": request.route, "fingerprint": request.fingerprint, **request.details},
        }
        if decision.approval_id is not None:
            event["approval_id"] = decision.approval_id
        if request.findings:
            event["findings"] = request.findings
        return event


def conclude(decided: Decision, request: DecisionRequest, decision_id: str) -> Decision:
    """Policy's answer with the request's refusals (deny, whatever policy said) and notes applied."""
    reasons = [*decided.reasons, *request.refusals, *request.notes]
    effect = "deny" if request.refusals else decided.effect
    return Decision(
        effect,
        reasons,
        decided.errors,
        decided.obligations,
        decided.policy_revision,
        decision_id,
        request.refusals,
    )
