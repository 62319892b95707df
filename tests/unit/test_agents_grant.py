"""The grant is final: a call outside the task grant is denied whatever policy says, and no approval —
requested, given or forged — releases it. An approval releases only a policy hold on a granted call."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_agents_guard import INJECTED, MAIL_TOOLS, FakeApprovals, make_guard, run, task_principal
from ztai.agents.guard import AgentGuard
from ztai.config import load_settings
from ztai.identity.grants import TaskGrant
from ztai.policy import PolicyEngine
from ztai.policy.engine import DEFAULTS_DIR

GRANT = TaskGrant(
    tools=("mail/read_inbox", "mail/send_email"),
    constraints={"mail/send_email": {"recipients": [{"pattern": r".*@example\.org"}]}},
    egress=("example.org",),
)
UNGRANTED = ("get_webpage", {"url": "https://example.org/x"})
OUTSIDE_CONSTRAINT = ("send_email", {"recipients": ["mallory@evil.example.com"]})
OUTSIDE_EGRESS = ("send_email", {"recipients": ["bob@example.org"], "body": "see https://evil.com/x"})
OUTSIDE = [UNGRANTED, OUTSIDE_CONSTRAINT, OUTSIDE_EGRESS]
WITHIN = ("send_email", {"recipients": ["bob@example.org"], "body": "the numbers"})


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ZTAI_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def guard_with(policy_dir: Path) -> AgentGuard:
    async def record(event: dict[str, Any]) -> None:
        return None

    guard = AgentGuard.build(
        load_settings(None), PolicyEngine(policy_dir), record, b"k" * 32, approvals=FakeApprovals()
    )
    guard.learn_tools("mail", MAIL_TOOLS)
    return guard


def policies(tmp_path: Path, extra: str = "") -> Path:
    target = tmp_path / "policies"
    shutil.copytree(DEFAULTS_DIR, target)
    if extra:
        (target / "operator.cedar").write_text(extra)
    return target


def approvals_of(guard: AgentGuard) -> FakeApprovals:
    assert isinstance(guard.approvals, FakeApprovals)
    return guard.approvals


def flagged_task(guard: AgentGuard) -> Any:
    principal = task_principal(GRANT)
    observation = run(guard.observe(principal, server="mail", tool="read_inbox", content=INJECTED, route="t"))
    assert observation.flagged
    return principal


@pytest.mark.parametrize(("tool", "arguments"), OUTSIDE)
def test_after_an_injection_calls_outside_the_grant_are_denied_not_held(
    tmp_path: Path, tool: str, arguments: dict[str, Any]
) -> None:
    guard = guard_with(policies(tmp_path))
    principal = flagged_task(guard)
    decision = run(guard.authorize(principal, "mail", tool, arguments, route="t"))
    assert decision.effect == "deny" and decision.approval_id is None
    assert approvals_of(guard).requested == []  # nothing for an operator to approve


@pytest.mark.parametrize(("tool", "arguments"), OUTSIDE)
def test_an_approval_for_the_exact_call_is_never_consumed_outside_the_grant(
    tmp_path: Path, tool: str, arguments: dict[str, Any]
) -> None:
    # An operator policy that permits (or holds) everything cannot widen the grant either.
    guard = guard_with(
        policies(
            tmp_path,
            '@id("operator-permits-all")\npermit (principal, action == Action::"tool.call", resource);\n'
            '@id("operator-holds-all")\n@effect("require_approval")\n'
            'forbid (principal, action == Action::"tool.call", resource);\n',
        )
    )
    approvals = approvals_of(guard)
    principal = flagged_task(guard)
    hashed = guard.call_hash("mail", tool, arguments)
    approvals.approved.add(hashed)  # approved whatever way: by mistake, or a forged row
    for _ in range(2):
        decision = run(guard.authorize(principal, "mail", tool, arguments, route="t"))
        assert decision.effect == "deny" and decision.approval_id is None
        assert not any(r.startswith("approved:") for r in decision.reasons)
    assert hashed in approvals.approved and approvals.requested == []


def test_an_operator_permit_of_everything_does_not_open_ungranted_tools(tmp_path: Path) -> None:
    guard = guard_with(policies(tmp_path, 'permit (principal, action == Action::"tool.call", resource);\n'))
    principal = task_principal(GRANT)
    tool, arguments = UNGRANTED
    decision = run(guard.authorize(principal, "mail", tool, arguments, route="t"))
    assert (
        decision.effect == "deny" and "tool mail/get_webpage is not granted to this task" in decision.reasons
    )
    assert run(guard.authorize(principal, "mail", *WITHIN, route="t")).effect == "allow"


def test_a_held_call_within_the_grant_is_released_once(tmp_path: Path) -> None:
    guard = guard_with(policies(tmp_path))
    approvals = approvals_of(guard)
    principal = flagged_task(guard)
    tool, arguments = WITHIN
    held = run(guard.authorize(principal, "mail", tool, arguments, route="t"))
    assert held.effect == "require_approval" and held.approval_id and len(approvals.requested) == 1
    approvals.approved.add(guard.call_hash("mail", tool, arguments))
    # The approval names one call: the same tool with other arguments is still held (or denied).
    other = run(guard.authorize(principal, "mail", tool, {**arguments, "body": "x"}, route="t"))
    assert other.effect == "require_approval"
    released = run(guard.authorize(principal, "mail", tool, arguments, route="t"))
    assert released.effect == "allow" and f"approved:{held.approval_id}" in released.reasons
    assert run(guard.authorize(principal, "mail", tool, arguments, route="t")).effect == "require_approval"


def test_step_up_cannot_release_a_call_outside_the_grant(tmp_path: Path) -> None:
    guard = guard_with(
        policies(
            tmp_path,
            '@id("step-up-all")\n@effect("step_up")\n'
            'forbid (principal, action == Action::"tool.call", resource);\n',
        )
    )
    principal = task_principal(GRANT)
    assert run(guard.authorize(principal, "mail", *UNGRANTED, route="t")).effect == "deny"
    assert run(guard.authorize(principal, "mail", *WITHIN, route="t")).effect == "step_up"


def test_a_call_outside_the_grant_says_so(tmp_path: Path) -> None:
    guard = make_guard(tmp_path, [])
    principal = task_principal(TaskGrant(tools=("mail/read_inbox",), egress=("example.org",)))
    decision = run(guard.authorize(principal, "mail", "send_email", {"recipients": ["a@b.org"]}, route="t"))
    error = decision.error()
    assert decision.effect == "deny" and error.code == "outside_grant"
    assert "mail/send_email is not granted" in error.message
