"""What-if replay: decide recorded decisions again with a candidate policy set, and say what changes.

Each decision record holds what was decided on (`ztai.policy.decider`): the entities, the context Cedar
saw, the refusals found before policy, and the schema revision it was validated under. Replay rebuilds
the request from the record, decides it with the candidate bundle (the same validation and the same
refusals, so a call outside its task grant stays denied) and compares with what policy said then
(`policy` in the record: before an approval or a budget amended it). Nothing is guessed: a record made
under another schema, one written before records held their input, and one whose tool arguments were
withheld when the candidate reads `context.input`, count as not replayable. Replay writes nothing and
depends only on the records and the candidate policies (the recorded time is the time decided on).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ztai.policy.decider import DecisionRequest, Entity, conclude
from ztai.policy.decision import Decision
from ztai.policy.engine import DEFAULT_DENY, PolicyBundle, decide_with

# Why a record cannot be decided again.
OTHER_SCHEMA = "other_schema"
NO_INPUT = "no_recorded_input"
INPUT_WITHHELD = "input_withheld"


@dataclass(frozen=True)
class Change:
    """A recorded decision the candidate decides differently."""

    decision_id: str
    before: str
    after: str
    reasons: list[str]  # the candidate's reasons
    policies: list[str]  # the policy ids that made the difference (see `compare`)

    def to_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "before": self.before,
            "after": self.after,
            "reasons": self.reasons,
        }


@dataclass
class WhatIfReport:
    """What replaying a stretch of the log with a candidate policy set found."""

    candidate_revision: str
    considered: int = 0
    replayed: int = 0
    not_replayable: Counter[str] = field(default_factory=Counter)
    changes: list[Change] = field(default_factory=list)

    @property
    def transitions(self) -> Counter[str]:
        return Counter(f"{change.before}->{change.after}" for change in self.changes)

    @property
    def by_policy(self) -> Counter[str]:
        return Counter(policy for change in self.changes for policy in change.policies)

    def summary(self) -> dict[str, Any]:
        return {
            "candidate_revision": self.candidate_revision,
            "considered": self.considered,
            "replayed": self.replayed,
            "not_replayable": sum(self.not_replayable.values()),
            "not_replayable_by_reason": dict(sorted(self.not_replayable.items())),
            "changed": len(self.changes),
            "by_effect": dict(sorted(self.transitions.items())),
            "by_policy": dict(sorted(self.by_policy.items())),
        }


def replay(records: Iterable[dict[str, Any]], candidate: PolicyBundle) -> WhatIfReport:
    """Decide every decision record of `records` again with `candidate` (other events are skipped)."""
    report = WhatIfReport(candidate.revision)
    for record in records:
        if record.get("kind") != "decision":
            continue
        report.considered += 1
        problem = unreplayable(record, candidate)
        if problem is not None:
            report.not_replayable[problem] += 1
            continue
        report.replayed += 1
        after = redecide(record, candidate)
        change = compare(record, after)
        if change is not None:
            report.changes.append(change)
    return report


def unreplayable(record: dict[str, Any], candidate: PolicyBundle) -> str | None:
    """Why `record` cannot be decided again by `candidate`, or None."""
    if not isinstance(record.get("input"), dict) or not isinstance(record.get("policy"), dict):
        return NO_INPUT
    if record.get("schema_revision") != candidate.schema_revision:
        return OTHER_SCHEMA
    reads_input = candidate.context_keys is None or "input" in candidate.context_keys
    if reads_input and record["input"].get("input_withheld"):
        return INPUT_WITHHELD
    return None


def redecide(record: dict[str, Any], candidate: PolicyBundle) -> Decision:
    """The candidate's decision on the recorded request (an evaluation: no id, nothing written)."""
    recorded = record["input"]
    principal, resource = recorded["principal"], recorded["resource"]
    request = DecisionRequest(
        tenant=str(record.get("tenant", "")),
        principal=Entity(principal["type"], principal["id"]),
        action=recorded["action"],
        resource=Entity(resource["type"], resource["id"]),
        context=recorded["context"],
        refusals=tuple(recorded.get("refusals", ())),
        notes=tuple(recorded.get("notes", ())),
    )
    return conclude(decide_with(candidate, request.cedar()), request, "")


def compare(record: dict[str, Any], after: Decision) -> Change | None:
    """The change from what policy said then to `after`, when effect or obligations differ."""
    before = record["policy"]
    if before["effect"] == after.effect and sorted(record.get("obligations", [])) == sorted(
        after.obligations
    ):
        return None
    # The policies that made the difference: those the candidate's decision names and the recorded one
    # did not; where there are none (a permit was taken away: a default deny), those no longer named.
    notes = {*record["input"].get("refusals", ()), *record["input"].get("notes", ()), DEFAULT_DENY}
    added = set(after.reasons) - set(before["reasons"]) - notes
    removed = set(before["reasons"]) - set(after.reasons) - notes
    return Change(str(record["id"]), before["effect"], after.effect, after.reasons, sorted(added or removed))
