"""The one answer every path gets: `Decision` (effect, reasons, obligations, and the id of its record)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ztai.errors import ApprovalRequired, PermissionDenied, StepUpRequired

Effect = Literal["allow", "deny", "step_up", "require_approval", "allow_with_obligations"]
EFFECTS: tuple[Effect, ...] = ("allow", "deny", "step_up", "require_approval", "allow_with_obligations")


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request, with everything needed to explain it.

    `id` names its decision record in the audit log ("" for an evaluation that is not recorded: policy
    tests, what-if replay). `refusals` are what the caller found before policy was asked (a tool call
    outside its task grant): they deny whatever policy says. `approval_id` names the held call of a
    `require_approval` (or the approval a retried call used)."""

    effect: Effect
    reasons: list[str]
    errors: list[str] = field(default_factory=list)
    obligations: list[str] = field(default_factory=list)
    policy_revision: str = ""
    id: str = ""
    refusals: tuple[str, ...] = ()
    approval_id: str | None = None

    @property
    def allowed(self) -> bool:
        return self.effect in ("allow", "allow_with_obligations")

    def amended(self, effect: Effect, reasons: list[str], approval_id: str | None = None) -> Decision:
        """The same decision after a step that follows policy (an approval used, a budget spent)."""
        return dataclasses.replace(self, effect=effect, reasons=reasons, approval_id=approval_id)

    def error(self) -> PermissionDenied:
        """The error for a tool call this decision does not allow (the MCP and agents paths)."""
        if self.effect == "require_approval" and self.approval_id:
            return ApprovalRequired(
                f"tool call held for approval {self.approval_id}: ask an operator to run "
                f"`ztai approvals approve {self.approval_id}`, then retry the same call",
                decision_id=self.id,
                approval_id=self.approval_id,
            )
        if self.effect == "require_approval":
            return PermissionDenied(
                "tool call requires approval", decision_id=self.id, code="approval_required"
            )
        if self.effect == "step_up":
            return StepUpRequired("step-up authentication required for this call", decision_id=self.id)
        if self.refusals:
            return PermissionDenied(
                "tool call outside the task grant: " + "; ".join(self.refusals)[:500],
                decision_id=self.id,
                code="outside_grant",
            )
        return PermissionDenied("tool call denied by policy", decision_id=self.id)

    def to_json(self) -> dict[str, Any]:
        """The decision as the authorization APIs answer it."""
        return {
            "decision_id": self.id,
            "effect": self.effect,
            "reasons": self.reasons,
            "obligations": self.obligations,
            "approval_id": self.approval_id,
        }
