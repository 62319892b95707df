"""What-if replay on a synthetic log: changes counted by effect and policy, old records not guessed,
the CLI's --json lines, --since and --limit."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from ztai.audit import AuditLog
from ztai.cli.main import app as cli_app
from ztai.identity import KeyStore
from ztai.policy import (
    Decider,
    DecisionRequest,
    Entity,
    PolicyEngine,
    load_bundle,
    merge_context,
    model_entities,
    principal_entity,
)
from ztai.policy.engine import DEFAULTS_DIR, PolicyBundle
from ztai.policy.whatif import INPUT_WITHHELD, NO_INPUT, OTHER_SCHEMA, replay
from ztai.store import open_database

MODELS = model_entities([("mock", "mock"), ("gpt", "openai")])
NO_GPT = '@id("no-gpt")\nforbid (principal, action == Action::"chat", resource == Model::"gpt");\n'
READS_INPUT = (
    '@id("big-amounts")\nforbid (principal, action == Action::"tool.call", resource)\n'
    "when { context.input has amount && context.input.amount > 1000 };\n"
)


def chat(user: str, model: str, models: list[str]) -> DecisionRequest:
    return DecisionRequest(
        tenant="example.org",
        principal=principal_entity(f"spiffe://example.org/user/{user}", "user"),
        action="chat",
        resource=Entity("Model", model),
        context=merge_context({"tenant": "example.org", "token": {"models": models}}),
        route="/chat/completions",
    )


def tool_call(granted: bool, arguments: dict[str, Any]) -> DecisionRequest:
    context = merge_context({"tool": {"granted": granted, "read_only": True}})
    context["input"] = arguments
    return DecisionRequest(
        tenant="example.org",
        principal=principal_entity("spiffe://example.org/agent/bot", "agent"),
        action="tool.call",
        resource=Entity("Tool", "bank/pay"),
        context=context,
        refusals=() if granted else ("tool bank/pay is not granted to this task",),
    )


def records(requests: list[DecisionRequest]) -> list[dict[str, Any]]:
    decider = Decider(PolicyEngine(DEFAULTS_DIR, MODELS))
    return [decider.record_of(r, decider.evaluate(r)) for r in requests]


def candidate(tmp_path: Path, *extra: str) -> PolicyBundle:
    directory = tmp_path / "candidate"
    shutil.copytree(DEFAULTS_DIR, directory)
    for index, text in enumerate(extra):
        (directory / f"extra{index}.cedar").write_text(text)
    return load_bundle(directory, MODELS)


def test_a_stricter_candidate_changes_exactly_the_decisions_it_covers(tmp_path: Path) -> None:
    log = records(
        [
            chat("alice", "gpt", ["gpt"]),  # allow -> deny (no-gpt)
            chat("bob", "gpt", ["*"]),  # allow -> deny (no-gpt)
            chat("carol", "mock", ["mock"]),  # allow, unchanged
            chat("dave", "gpt", []),  # deny, unchanged
            tool_call(False, {}),  # outside the grant: stays deny whatever policy says
        ]
    )
    report = replay(log, candidate(tmp_path, NO_GPT))
    assert (report.considered, report.replayed, len(report.changes)) == (5, 5, 2)
    assert [c.decision_id for c in report.changes] == [log[0]["id"], log[1]["id"]]
    assert report.transitions == {"allow->deny": 2}
    assert report.by_policy == {"no-gpt": 2}
    assert report.changes[0].to_json() == {
        "decision_id": log[0]["id"],
        "before": "allow",
        "after": "deny",
        "reasons": ["no-gpt"],
    }
    assert replay(log, candidate(tmp_path / "same")).changes == []  # the same policies: nothing changes


def test_a_removed_permit_is_named_as_the_policy_that_made_the_difference(tmp_path: Path) -> None:
    log = records([chat("alice", "mock", ["mock"])])
    directory = tmp_path / "fewer"
    shutil.copytree(DEFAULTS_DIR, directory)
    (directory / "models.cedar").unlink()
    report = replay(log, load_bundle(directory, MODELS))
    assert report.transitions == {"allow->deny": 1} and report.by_policy == {"models-listed-in-token": 1}


def test_replay_compares_with_what_policy_said_not_with_later_steps(tmp_path: Path) -> None:
    decider = Decider(PolicyEngine(DEFAULTS_DIR, MODELS))
    request = tool_call(True, {})
    evaluated = decider.evaluate(request)
    spent = evaluated.amended("deny", [*evaluated.reasons, "call budget of task t exhausted (1 calls)"])
    record = decider.record_of(request, spent, evaluated)
    assert replay([record], candidate(tmp_path)).changes == []  # allow then, allow now


def test_records_under_another_schema_or_without_input_are_not_replayable(tmp_path: Path) -> None:
    [current, older, legacy] = records([chat("a", "gpt", ["gpt"]) for _ in range(3)])
    older["schema_revision"] = "0" * 16
    del legacy["input"], legacy["policy"]  # as written before records held their input
    report = replay([current, older, legacy], candidate(tmp_path, NO_GPT))
    assert (report.considered, report.replayed, len(report.changes)) == (3, 1, 1)
    assert report.not_replayable == {OTHER_SCHEMA: 1, NO_INPUT: 1}
    assert report.summary()["not_replayable"] == 2


def test_withheld_arguments_are_not_guessed_when_the_candidate_reads_them(tmp_path: Path) -> None:
    log = records([tool_call(True, {"amount": 5000}), tool_call(True, {})])
    assert log[0]["input"]["input_withheld"] and "5000" not in orjson.dumps(log[0]).decode()
    report = replay(log, candidate(tmp_path, READS_INPUT))
    assert report.not_replayable == {INPUT_WITHHELD: 1} and report.replayed == 1
    assert replay(log, candidate(tmp_path / "plain")).replayed == 2  # reads no input: both replay


def test_non_decision_events_are_skipped(tmp_path: Path) -> None:
    report = replay([{"kind": "token.issued", "id": "evt_1"}], candidate(tmp_path))
    assert report.considered == 0


# The CLI over a real audit log ---------------------------------------------------------------------
def test_cli_whatif_json_lines_since_and_limit(ztai_home: Path, tmp_path: Path) -> None:
    keys = KeyStore.load(ztai_home / "data")
    database = open_database(f"sqlite:///{ztai_home / 'data' / 'ztai.db'}")
    database.migrate()
    audit_log = AuditLog(database, keys.audit.private_key)
    log = records([chat("alice", "gpt", ["gpt"]), chat("bob", "mock", ["mock"]), chat("eve", "gpt", ["*"])])
    old = datetime.now(UTC) - timedelta(days=1)
    log[0]["time"] = old.isoformat()
    audit_log.append(log)
    database.close()
    candidate_dir = tmp_path / "candidate"
    shutil.copytree(DEFAULTS_DIR, candidate_dir)
    (candidate_dir / "no-gpt.cedar").write_text(NO_GPT)
    runner = CliRunner()
    base = ["policy", "whatif", "--policies", str(candidate_dir), "--config", str(ztai_home / "ztai.yaml")]

    result = runner.invoke(cli_app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    *changed, last = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert changed == [
        {"decision_id": log[0]["id"], "before": "allow", "after": "deny", "reasons": ["no-gpt"]},
        {"decision_id": log[2]["id"], "before": "allow", "after": "deny", "reasons": ["no-gpt"]},
    ]
    assert last["summary"]["considered"] == 3 and last["summary"]["by_effect"] == {"allow->deny": 2}

    since = (old + timedelta(hours=1)).isoformat()
    recent = runner.invoke(cli_app, [*base, "--json", "--since", since])
    assert [orjson.loads(line).get("decision_id") for line in recent.stdout.splitlines()] == [
        log[2]["id"],
        None,
    ]
    newest = runner.invoke(cli_app, [*base, "--json", "--limit", "1"])
    assert orjson.loads(newest.stdout.splitlines()[-1])["summary"]["considered"] == 1

    table = runner.invoke(cli_app, base)
    assert table.exit_code == 0 and "3 recorded decisions considered" in table.stdout
    assert "2 would change" in table.stdout and "allow->deny" in table.stdout and "no-gpt" in table.stdout
    bad = runner.invoke(cli_app, [*base, "--since", "yesterday"])
    assert bad.exit_code == 2


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_cli_whatif_refuses_a_limit_below_one(ztai_home: Path, limit: str) -> None:
    args = ["policy", "whatif", "--policies", str(DEFAULTS_DIR), "--limit", limit]
    result = CliRunner().invoke(cli_app, [*args, "--config", str(ztai_home / "ztai.yaml")])
    assert result.exit_code == 2
