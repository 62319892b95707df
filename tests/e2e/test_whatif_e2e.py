"""End to end: decisions of every path (OpenAI route, token exchange, agent authorize, admin) are
recorded by the one Decider; what-if replay with a stricter candidate, through the CLI and the admin API,
finds exactly the decisions it changes and writes nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Gateway, exchange_form, start_gateway

pytestmark = pytest.mark.e2e

STRICTER = (
    '@id("no-other-model")\nforbid (principal, action == Action::"chat", resource == Model::"other");\n'
    '@id("no-delegation-to-assistant")\nforbid (principal, action == Action::"token.exchange", '
    'resource == Agent::"spiffe://example.org/agent/assistant");\n'
    '@id("no-inbox")\nforbid (principal, action == Action::"tool.call", resource == Tool::"mail/read_inbox");\n'
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    instance = start_gateway(tmp_path_factory.mktemp("whatif"))
    yield instance
    instance.close()


def chat(gateway: Gateway, token: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )


def decisions(gateway: Gateway) -> list[dict[str, Any]]:
    tail = gateway.cli("audit", "tail", "-n", "1000", "--json").stdout.splitlines()
    return [event for event in map(json.loads, tail) if event["kind"] == "decision"]


def test_whatif_finds_exactly_the_decisions_a_stricter_policy_changes(
    gateway: Gateway, tmp_path: Path
) -> None:
    alice = gateway.token("alice", "models=mock,other", "tools=mail/*")
    bob = gateway.token("bob", "models=mock")
    assistant = gateway.token("assistant", kind="agent")
    admin = gateway.token("ops", "roles=admin")

    # Model calls: two allowed, one denied.
    kept = chat(gateway, alice, "mock")
    changed_chat = chat(gateway, alice, "other")
    denied_chat = chat(gateway, bob, "other")
    assert (kept.status_code, changed_chat.status_code, denied_chat.status_code) == (200, 200, 403)
    # Token exchange: one allowed, one denied by policy (a tool alice's token does not list).
    form = exchange_form(alice, assistant, {"tools": ["mail/read_inbox"], "egress": ["*"]})
    issued = httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=10)
    assert issued.status_code == 200, issued.text
    wider = exchange_form(alice, assistant, {"tools": ["web/fetch"]})
    refused = httpx.post(f"{gateway.root_url}/oauth/token", data=wider, timeout=10)
    assert refused.status_code == 400 and refused.json()["decision_id"]
    # An agent's tool call, allowed.
    authorized = httpx.post(
        f"{gateway.root_url}/v1/agents/authorize",
        json={"server": "mail", "tool": "read_inbox"},
        headers={"authorization": f"Bearer {issued.json()['access_token']}"},
        timeout=10,
    ).json()
    assert authorized["effect"] == "allow"

    recorded = decisions(gateway)
    by_id = {event["id"]: event for event in recorded}
    issued_event = next(
        e
        for e in map(json.loads, gateway.cli("audit", "tail", "-n", "50", "--json").stdout.splitlines())
        if e["kind"] == "token.issued" and e.get("task") == issued.json()["task"]
    )
    expected = {
        changed_chat.headers["x-ztai-decision-id"]: ("chat", "Model::other"),
        issued_event["decision_id"]: ("token.exchange", "Agent::spiffe://example.org/agent/assistant"),
        authorized["decision_id"]: ("tool.call", "Tool::mail/read_inbox"),
    }
    for decision_id, (action, resource) in expected.items():  # one record shape for every path
        event = by_id[decision_id]
        assert (event["action"], event["resource"], event["effect"]) == (action, resource, "allow")
        assert event["input"]["context"]["tenant"] == "example.org" and event["schema_revision"]
        assert event["policy"]["effect"] == "allow" and event["request"]["route"]
    assert refused.json()["decision_id"] in by_id and denied_chat.json()["error"]["decision_id"] in by_id

    candidate = tmp_path / "candidate"
    shutil.copytree(gateway.home / "policies", candidate)
    (candidate / "stricter.cedar").write_text(STRICTER)
    lines = gateway.cli("policy", "whatif", "--policies", str(candidate), "--json").stdout.splitlines()
    *changes, summary_line = map(json.loads, lines)
    assert {c["decision_id"] for c in changes} == set(expected)
    assert all(set(c) == {"decision_id", "before", "after", "reasons"} for c in changes)
    assert all((c["before"], c["after"]) == ("allow", "deny") for c in changes)
    summary = summary_line["summary"]
    assert summary["considered"] == len(recorded) and summary["not_replayable"] == 0
    assert summary["by_effect"] == {"allow->deny": 3}
    assert {"no-other-model", "no-delegation-to-assistant", "no-inbox"} <= set(summary["by_policy"])
    assert len(decisions(gateway)) == len(recorded)  # replay wrote nothing

    sources = {path.name: path.read_text() for path in candidate.glob("*.cedar")}
    api = httpx.post(
        f"{gateway.root_url}/admin/policy/whatif",
        json={"policies": sources},
        headers={"authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert api.status_code == 200, api.text
    assert api.json()["changes"] == changes and api.json()["summary"] == summary  # CLI and API agree

    table = gateway.cli("policy", "whatif", "--policies", str(candidate)).stdout
    assert "3 would change" in table and "allow->deny" in table and "no-inbox" in table


def test_whatif_through_the_admin_api_is_admitted_and_bounded(gateway: Gateway) -> None:
    def post(token: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{gateway.root_url}/admin/policy/whatif",
            json=body,
            headers={"authorization": f"Bearer {token}"},
            timeout=10,
        )

    policies = {"p.cedar": (gateway.home / "policies" / "models.cedar").read_text()}
    assert post(gateway.token("mallory"), {"policies": policies}).status_code == 403
    admin = gateway.token("ops", "roles=admin")
    assert post(admin, {"policies": {"p.txt": "x"}}).status_code == 422
    broken = post(admin, {"policies": {"p.cedar": "permit (principal, action, resource) when {"}})
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_policies"
    assert post(admin, {"policies": policies, "limit": 0}).status_code == 422
    assert post(admin, {"policies": policies, "since": "yesterday"}).status_code == 422
    assert post(admin, {"policies": policies, "limit": 1}).json()["summary"]["considered"] == 1
