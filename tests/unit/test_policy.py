"""Cedar policy engine: validation, decisions and their explanation, reload, policy tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import cedarpy
import pytest

from ztai.errors import PolicyError
from ztai.policy import PolicyEngine, merge_context, model_entities, principal_request
from ztai.policy.decision import Decision
from ztai.policy.engine import DEFAULTS_DIR, _explain
from ztai.policy.testing import run_file

ALICE = "spiffe://example.org/user/alice"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(DEFAULTS_DIR, target)
    return target


@pytest.fixture
def engine(policy_dir: Path) -> PolicyEngine:
    return PolicyEngine(policy_dir, model_entities([("mock", "mock"), ("gpt", "openai")]))


def chat(engine: PolicyEngine, models: list[str], model: str = "mock", **context: object) -> object:
    request = principal_request(
        ALICE, "user", "chat", "Model", model, merge_context({"token": {"models": models}, **context})
    )
    return engine.decide(request)


def test_listed_model_is_allowed_with_the_policy_id_as_reason(engine: PolicyEngine) -> None:
    decision = chat(engine, ["mock"])
    assert decision.effect == "allow"  # type: ignore[attr-defined]
    assert decision.reasons == ["models-listed-in-token"]  # type: ignore[attr-defined]
    assert decision.policy_revision == engine.revision  # type: ignore[attr-defined]


def test_default_deny_names_itself(engine: PolicyEngine) -> None:
    decision = chat(engine, ["other"])
    assert (decision.effect, decision.reasons) == ("deny", ["default-deny"])  # type: ignore[attr-defined]


def test_high_risk_steps_up(engine: PolicyEngine) -> None:
    decision = chat(engine, ["mock"], risk_score=95)
    assert decision.effect == "step_up"  # type: ignore[attr-defined]


def test_plain_forbid_beats_step_up(engine: PolicyEngine, policy_dir: Path) -> None:
    (policy_dir / "block.cedar").write_text(
        '@id("no-gpt")\nforbid (principal, action, resource == Model::"gpt");\n'
    )
    engine.reload()
    decision = chat(engine, ["gpt"], model="gpt", risk_score=95)
    assert decision.effect == "deny"  # type: ignore[attr-defined]
    assert decision.reasons == ["no-gpt"]  # type: ignore[attr-defined]  (the forbid that decided)


def tool_call(engine: PolicyEngine, **context: object) -> Decision:
    request = principal_request(
        "spiffe://example.org/agent/bot", "agent", "tool.call", "Tool", "mail/send", merge_context(context)
    )
    return engine.decide(request)


FLAGGED_SIDE_EFFECT = {"session": {"flagged": True}, "tool": {"read_only": False}}


def test_soft_forbid_without_a_permit_is_a_default_deny(engine: PolicyEngine) -> None:
    # The attack: an ungranted call after an injection must not become a hold an approval releases.
    ungranted = tool_call(engine, **FLAGGED_SIDE_EFFECT)
    assert ungranted.effect == "deny"
    assert ungranted.reasons == ["approve-side-effects-after-injection", "default-deny"]
    stepped = chat(engine, ["other"], risk_score=95)  # high risk, model not listed: no step-up offered
    assert (stepped.effect, stepped.reasons) == ("deny", ["step-up-on-high-risk", "default-deny"])  # type: ignore[attr-defined]


def test_soft_forbid_with_a_permit_softens_it(engine: PolicyEngine) -> None:
    granted = {**FLAGGED_SIDE_EFFECT, "tool": {"read_only": False, "granted": True}}
    held = tool_call(engine, **granted)
    assert (held.effect, held.reasons) == ("require_approval", ["approve-side-effects-after-injection"])
    assert tool_call(engine, tool={"read_only": False, "granted": True}).effect == "allow"
    assert chat(engine, ["mock"], risk_score=95).effect == "step_up"  # type: ignore[attr-defined]


def test_strongest_soft_effect_wins_and_every_action_is_covered(
    engine: PolicyEngine, policy_dir: Path
) -> None:
    (policy_dir / "extra.cedar").write_text(
        '@id("hold-admin")\n@effect("require_approval")\n'
        'forbid (principal, action == Action::"admin", resource);\n'
    )
    engine.reload()
    granted = {**FLAGGED_SIDE_EFFECT, "tool": {"read_only": False, "granted": True}, "risk_score": 95}
    both = tool_call(engine, **granted)
    assert both.effect == "require_approval"
    assert set(both.reasons) == {"approve-side-effects-after-injection", "step-up-on-high-risk"}
    admin = principal_request(ALICE, "user", "admin", "AdminApi", "approvals", merge_context({}))
    assert engine.decide(admin).effect == "deny"  # no admin role: the hold does not apply
    context = merge_context({"token": {"roles": ["admin"]}})
    admin = principal_request(ALICE, "user", "admin", "AdminApi", "approvals", context)
    assert engine.decide(admin).effect == "require_approval"
    assert engine.decide_many([admin])[0].effect == "require_approval"


def test_effect_annotation_only_on_forbids(engine: PolicyEngine, policy_dir: Path) -> None:
    (policy_dir / "extra.cedar").write_text(
        '@id("odd")\n@effect("require_approval")\npermit (principal, action == Action::"embed", resource);\n'
    )
    with pytest.raises(PolicyError, match="odd: @effect is only allowed on a forbid"):
        engine.reload()


def test_obligations_come_from_permit_annotations(engine: PolicyEngine, policy_dir: Path) -> None:
    (policy_dir / "agents.cedar").write_text(
        '@id("agents-redacted")\n@obligation("redact_pii")\n'
        'permit (principal is Agent, action == Action::"chat", resource is Model);\n'
    )
    engine.reload()
    request = principal_request(
        "spiffe://example.org/agent/bot", "agent", "chat", "Model", "gpt", merge_context({})
    )
    decision = engine.decide(request)
    assert decision.effect == "allow_with_obligations"
    assert decision.obligations == ["redact_pii"]


def test_evaluation_errors_fail_closed(engine: PolicyEngine) -> None:
    # A context missing an attribute the policies read makes Cedar skip those policies: we deny.
    request = principal_request(ALICE, "user", "chat", "Model", "mock", {"token": {"models": ["mock"]}})
    decision = engine.decide(request)
    assert decision.effect == "deny" and decision.errors


def test_invalid_policy_is_rejected_and_old_set_stays_active(engine: PolicyEngine, policy_dir: Path) -> None:
    before = engine.revision
    (policy_dir / "broken.cedar").write_text(
        "permit (principal, action, resource) when { context.nope > 1 };"
    )
    with pytest.raises(PolicyError, match="validation"):
        engine.reload()
    assert engine.revision == before
    assert chat(engine, ["mock"]).effect == "allow"  # type: ignore[attr-defined]
    (policy_dir / "broken.cedar").write_text("permit (principal, action, resource) when {")
    with pytest.raises(PolicyError):
        engine.reload()
    assert engine.revision == before


def test_duplicate_ids_and_empty_directories_are_rejected(policy_dir: Path, tmp_path: Path) -> None:
    (policy_dir / "dup.cedar").write_text(
        '@id("models-listed-in-token")\npermit (principal, action == Action::"chat", resource);\n'
    )
    with pytest.raises(PolicyError, match="duplicate"):
        PolicyEngine(policy_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="no \\*.cedar"):
        PolicyEngine(tmp_path / "empty")


def test_unannotated_policies_get_file_based_ids(engine: PolicyEngine, policy_dir: Path) -> None:
    (policy_dir / "extra.cedar").write_text(
        'permit (principal, action == Action::"embed", resource is Model);\n'
    )
    engine.reload()
    request = principal_request(ALICE, "user", "embed", "Model", "gpt", merge_context({}))
    assert engine.decide(request).reasons == ["extra:0"]


def test_decide_many_matches_decide(engine: PolicyEngine) -> None:
    context = merge_context({"token": {"models": ["mock"]}})
    requests = [principal_request(ALICE, "user", "chat", "Model", m, context) for m in ("mock", "gpt")]
    assert [d.effect for d in engine.decide_many(requests)] == ["allow", "deny"]


def test_shipped_policy_tests_pass(engine: PolicyEngine, policy_dir: Path) -> None:
    results = run_file(engine, policy_dir / "tests.yaml")
    assert results and all(r.passed for r in results), [r.problem for r in results if not r.passed]


def test_policy_test_runner_reports_failures(engine: PolicyEngine, tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - {principal: 'spiffe://example.org/user/a', action: chat, resource: mock, expect: allow}\n"
    )
    [result] = run_file(engine, cases)
    assert not result.passed and "expected allow, got deny" in result.problem
    cases.write_text("cases: [{principal: x}]\n")
    with pytest.raises(PolicyError):
        run_file(engine, cases)


def test_context_is_projected_onto_the_attributes_policies_read(
    engine: PolicyEngine, policy_dir: Path
) -> None:
    assert engine.bundle.context_keys == frozenset(
        {"token", "risk_score", "content", "tool", "session", "exchange"}
    )
    (policy_dir / "net.cedar").write_text(
        '@id("office-only")\nforbid (principal, action, resource) unless { context has network && '
        'context.network.ip like "10.*" };\n'
    )
    engine.reload()
    assert engine.bundle.context_keys == frozenset(
        {"token", "risk_score", "content", "tool", "session", "exchange", "network"}
    )
    (policy_dir / "whole.cedar").write_text(
        '@id("whole")\nforbid (principal, action, resource) when { context == context && false };\n'
    )
    engine.reload()
    assert engine.bundle.context_keys is None  # `context` used as a whole: nothing is left out


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.168.0.1"])
@pytest.mark.parametrize("risk", [0, 85])
def test_projection_never_changes_a_decision(
    engine: PolicyEngine, policy_dir: Path, ip: str, risk: int
) -> None:
    (policy_dir / "net.cedar").write_text(
        '@id("office-only")\nforbid (principal, action, resource) unless { context.network.ip like "10.*" };\n'
    )
    engine.reload()
    context = merge_context({"token": {"models": ["mock"]}, "risk_score": risk, "network": {"ip": ip}})
    request = principal_request(ALICE, "user", "chat", "Model", "mock", context)
    projected = engine.decide(request)
    full = _explain(
        cedarpy.is_authorized(request.to_cedar(None), engine.bundle.policies, engine.bundle.entities),
        engine.bundle,
    )
    assert (projected.effect, sorted(projected.reasons)) == (full.effect, sorted(full.reasons))
