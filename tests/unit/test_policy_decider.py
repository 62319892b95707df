"""The Decider: schema-validated context, revision digests, one decision record, one Decision type."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from ztai.errors import PolicyEvaluationError
from ztai.policy import (
    Decider,
    Decision,
    DecisionRequest,
    Entity,
    PolicyEngine,
    merge_context,
    model_entities,
    principal_entity,
)
from ztai.policy.engine import DEFAULTS_DIR, INVALID_CONTEXT, schema_revision

ALICE = "spiffe://example.org/user/alice"
BOT = "spiffe://example.org/agent/bot"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(DEFAULTS_DIR, target)
    return target


@pytest.fixture
def engine(policy_dir: Path) -> PolicyEngine:
    return PolicyEngine(policy_dir, model_entities([("mock", "mock")]))


def chat(context: dict[str, Any], **fields: Any) -> DecisionRequest:
    return DecisionRequest(
        tenant="example.org",
        principal=principal_entity(ALICE, "user"),
        action="chat",
        resource=Entity("Model", "mock"),
        context=context,
        route="/chat/completions",
        **fields,
    )


def listed() -> dict[str, Any]:
    return merge_context({"tenant": "example.org", "token": {"models": ["mock"]}})


def test_a_valid_request_is_decided_and_named(engine: PolicyEngine) -> None:
    decision = Decider(engine).evaluate(chat(listed()))
    assert isinstance(decision, Decision)
    assert (decision.effect, decision.reasons) == ("allow", ["models-listed-in-token"])
    assert decision.id.startswith("dec_") and decision.policy_revision == engine.revision
    assert Decider(engine).evaluate(chat(listed()), decision_id="").id == ""  # an evaluation only


@pytest.mark.parametrize(
    "spoil",
    [
        lambda c: c.update(sesion=c.pop("session")),  # a misspelt top-level attribute
        lambda c: c["tool"].update(granetd=c["tool"].pop("granted")),  # a misspelt nested one
        lambda c: c.update(risk_score="high"),  # a wrong type
        lambda c: c["token"].update(models="mock"),  # a string where a set belongs
        lambda c: c.pop("exchange"),  # a missing attribute no policy of this request reads
        lambda c: c.update(extra=1),  # an attribute the schema does not know
    ],
)
def test_a_context_that_does_not_match_the_schema_is_denied_and_logged(
    engine: PolicyEngine, spoil: Any, caplog: pytest.LogCaptureFixture
) -> None:
    context = listed()
    spoil(context)
    with caplog.at_level(logging.ERROR, logger="ztai.policy"):
        decision = Decider(engine).evaluate(chat(context))
    assert (decision.effect, decision.reasons) == ("deny", [INVALID_CONTEXT])
    assert decision.errors and "failed to build request" in decision.errors[0]
    assert any("does not match the schema" in r.message for r in caplog.records)


def test_validated_shapes_are_remembered_and_a_new_shape_is_validated_again(engine: PolicyEngine) -> None:
    decider = Decider(engine)
    assert decider.evaluate(chat(listed())).effect == "allow"
    shapes = len(engine.bundle.valid_shapes)
    assert decider.evaluate(chat(listed())).effect == "allow"
    assert len(engine.bundle.valid_shapes) == shapes  # same shape: not validated again
    wrong = listed()
    wrong["content"]["pii_types"] = [1]  # the set's element type changes the shape
    assert decider.evaluate(chat(wrong)).reasons == [INVALID_CONTEXT]


def test_a_principal_type_the_action_does_not_apply_to_is_denied(engine: PolicyEngine) -> None:
    request = DecisionRequest(
        tenant="example.org",
        principal=Entity("Model", "mock"),
        action="token.exchange",  # applies to User, Agent and Service principals only
        resource=Entity("Agent", BOT),
        context=listed(),
    )
    assert Decider(engine).evaluate(request).reasons == [INVALID_CONTEXT]


def test_tool_arguments_may_have_any_shape(engine: PolicyEngine, policy_dir: Path) -> None:
    (policy_dir / "amount.cedar").write_text(
        '@id("big-amounts")\nforbid (principal, action == Action::"tool.call", resource)\n'
        "when { context.input has amount && context.input.amount > 1000 };\n"
    )
    engine.reload()
    context = merge_context({"tool": {"granted": True, "read_only": True}})
    context["input"] = {"amount": 5000, "to": {"iban": "DE00"}}
    request = DecisionRequest(
        tenant="example.org",
        principal=principal_entity(BOT, "agent"),
        action="tool.call",
        resource=Entity("Tool", "bank/pay"),
        context=context,
    )
    assert Decider(engine).evaluate(request).reasons == ["big-amounts"]


def test_the_revision_digests_policies_and_schema(engine: PolicyEngine, policy_dir: Path) -> None:
    before = engine.revision
    assert engine.bundle.schema_revision == schema_revision() and len(before) == 16
    (policy_dir / "extra.cedar").write_text('permit (principal, action == Action::"embed", resource);\n')
    engine.reload()
    assert engine.revision != before and engine.bundle.schema_revision == schema_revision()
    (policy_dir / "extra.cedar").unlink()
    engine.reload()
    assert engine.revision == before  # the same policies and schema: the same revision


def test_refusals_deny_whatever_policy_says_and_notes_explain(engine: PolicyEngine) -> None:
    decision = Decider(engine).evaluate(chat(listed(), refusals=("outside the grant",), notes=("profiled",)))
    assert decision.effect == "deny" and decision.refusals == ("outside the grant",)
    assert decision.reasons == ["models-listed-in-token", "outside the grant", "profiled"]
    assert decision.error().code == "outside_grant"


def test_the_record_holds_what_was_decided_on(engine: PolicyEngine) -> None:
    events: list[dict[str, Any]] = []

    async def record(event: dict[str, Any]) -> None:
        events.append(event)

    decider = Decider(engine, record)
    context = listed()
    findings = [{"type": "EMAIL_ADDRESS", "hash": "ab12", "source": "prompt"}]
    request = chat(context, fingerprint="f" * 64, details={"jti": "j1", "ip": "127.0.0.1"}, findings=findings)
    decision = asyncio.run(decider.decide(request))
    [event] = events
    assert event["id"] == decision.id and event["kind"] == "decision"
    assert (event["tenant"], event["principal"], event["action"], event["resource"]) == (
        "example.org",
        ALICE,
        "chat",
        "Model::mock",
    )
    assert (event["effect"], event["reasons"], event["obligations"]) == ("allow", decision.reasons, [])
    assert event["policy_revision"] == engine.revision
    assert event["schema_revision"] == engine.bundle.schema_revision
    assert event["policy"] == {"effect": "allow", "reasons": ["models-listed-in-token"]}
    assert event["input"] == {
        "principal": {"type": "User", "id": ALICE},
        "action": "chat",
        "resource": {"type": "Model", "id": "mock"},
        "context": context,
    }
    assert event["request"] == {
        "route": "/chat/completions",
        "fingerprint": "f" * 64,
        "jti": "j1",
        "ip": "127.0.0.1",
    }
    assert event["findings"] == findings


def test_the_record_withholds_tool_arguments_and_keeps_what_policy_said(engine: PolicyEngine) -> None:
    decider = Decider(engine)
    context = merge_context({"tool": {"granted": True, "read_only": True}})
    context["input"] = {"password": "hunter2"}
    request = DecisionRequest(
        tenant="example.org",
        principal=principal_entity(BOT, "agent"),
        action="tool.call",
        resource=Entity("Tool", "mail/read"),
        context=context,
        refusals=(),
        notes=("read-only: declared",),
    )
    evaluated = decider.evaluate(request)
    spent = evaluated.amended("deny", [*evaluated.reasons, "call budget exhausted"])
    event = decider.record_of(request, spent, evaluated)
    assert "hunter2" not in str(event)
    assert event["input"]["context"]["input"] == {} and event["input"]["input_withheld"] is True
    assert event["input"]["notes"] == ["read-only: declared"]
    assert (event["effect"], event["policy"]["effect"]) == ("deny", "allow")


def test_an_engine_failure_refuses(engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_request: object) -> Decision:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "decide", broken)
    with pytest.raises(PolicyEvaluationError):
        Decider(engine).evaluate(chat(listed()))


def test_evaluate_many_matches_evaluate_and_names_nothing(engine: PolicyEngine) -> None:
    decider = Decider(engine)
    requests = [chat(listed()), chat(merge_context({"token": {"models": ["other"]}})), chat({"bad": 1})]
    many = decider.evaluate_many(requests)
    assert (
        [d.effect for d in many]
        == [decider.evaluate(r).effect for r in requests]
        == ["allow", "deny", "deny"]
    )
    assert many[2].reasons == [INVALID_CONTEXT] and all(d.id == "" for d in many)
