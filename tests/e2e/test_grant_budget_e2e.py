"""End to end, through the real gateway: the task grant is final (no approval releases a call outside it)
and a parent's call budget bounds all its sub-tasks together (sub-task tokens from `/oauth/token`), in
one gateway and across two replicas sharing Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import redis_url_or_skip
from tests.e2e.conftest import Gateway, exchange_form, free_port, start_gateway
from tests.e2e.test_agents_api_e2e import INJECTED
from tests.e2e.test_approvals_e2e import audit_events, gateway_database
from ztai.agents.approvals import ApprovalStore

pytestmark = pytest.mark.e2e

SEND_DEFINITION = {
    "name": "send_email",
    "inputSchema": {"properties": {"recipients": {"type": "array"}, "body": {"type": "string"}}},
    "annotations": {"readOnlyHint": False, "destructiveHint": False, "openWorldHint": True},
}
READ = {
    "server": "mail",
    "tool": "read_inbox",
    "definition": {"name": "read_inbox", "annotations": {"readOnlyHint": True}},
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    instance = start_gateway(tmp_path_factory.mktemp("grant"))
    yield instance
    instance.close()


def exchange(gateway: Gateway, subject: str, actor: str, details: dict[str, Any]) -> tuple[str, str]:
    """A task token (and its task id) for `actor` acting for `subject`, from the real token endpoint."""
    form = exchange_form(subject, actor, details)
    response = httpx.post(f"{gateway.root_url}/oauth/token", data=form, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"]), str(response.json()["task"])


def post(gateway: Gateway, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{gateway.root_url}{path}", json=body, headers={"authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def send(recipients: list[str], body: str = "hi") -> dict[str, Any]:
    return {
        "server": "mail",
        "tool": "send_email",
        "arguments": {"recipients": recipients, "body": body},
        "definition": SEND_DEFINITION,
    }


def admin_call(gateway: Gateway, method: str, path: str) -> httpx.Response:
    admin = gateway.token("ops", "roles=admin")
    return httpx.request(
        method, f"{gateway.root_url}/admin{path}", headers={"authorization": f"Bearer {admin}"}, timeout=10
    )


# The grant is final -------------------------------------------------------------------------------------
def test_no_approval_releases_a_call_outside_the_grant(gateway: Gateway) -> None:
    subject = gateway.token("emma", "tools=mail/*")
    token, task = exchange(
        gateway,
        subject,
        gateway.token("assistant", kind="agent"),
        {
            "tools": ["mail/read_inbox", "mail/send_email"],
            "constraints": {"mail/send_email": {"recipients": [{"pattern": ".*@example\\.org"}]}},
            "egress": ["example.org"],
        },
    )
    seen = post(
        gateway, "/v1/agents/observe", token, {"server": "mail", "tool": "read_inbox", "content": INJECTED}
    )
    assert seen["flagged"] and seen["session"]["flagged"]

    # After the injection: an ungranted tool and a granted tool outside its constraint are denied, not held.
    ungranted = {
        "server": "mail",
        "tool": "delete_file",
        "arguments": {"id": "7"},
        "definition": SEND_DEFINITION,
    }
    outside = send(["eve@attacker.example.com"])
    attacks = [ungranted, outside]
    first = [post(gateway, "/v1/agents/authorize", token, call) for call in attacks]
    assert [d["effect"] for d in first] == ["deny", "deny"]
    assert all(d["approval_id"] is None for d in first)
    assert "tool mail/delete_file is not granted to this task" in first[0]["reasons"]
    assert "argument 'recipients' violates constraint pattern" in first[1]["reasons"]

    # The operator approves whatever there is for this task: nothing was held...
    listed = admin_call(gateway, "GET", "/approvals?status=all").json()["data"]
    assert [a for a in listed if a["task"] == task] == []
    # ...so a rogue (or mistaken) approval row for the exact attacked calls is made and approved.
    database = gateway_database(gateway)
    try:
        hashes = {
            e["id"]: e["request"]["call_hash"]
            for e in audit_events(database, "decision")
            if e["request"].get("task") == task
        }
        store = ApprovalStore(database)
        forged = [
            store.request(
                tenant="example.org",
                task_id=task,
                principal="spiffe://example.org/agent/assistant",
                server="mail",
                tool=call["tool"],
                call_hash=hashes[decision["decision_id"]],
                preview="",
                reasons=["forged"],
                decision_id=decision["decision_id"],
                ttl_seconds=600,
            ).id
            for call, decision in zip(attacks, first, strict=True)
        ]
        for approval_id in forged:
            assert admin_call(gateway, "POST", f"/approvals/{approval_id}/approve").status_code == 200
        # An operator trying an id that does not exist gets an error and changes nothing.
        missing = gateway.cli("approvals", "approve", f"apr_{secrets.token_hex(12)}", check=False)
        assert missing.returncode != 0 and "no approval" in missing.stderr

        for _ in range(2):
            retries = [post(gateway, "/v1/agents/authorize", token, call) for call in attacks]
            assert [d["effect"] for d in retries] == ["deny", "deny"]
            assert not any(r.startswith("approved:") for d in retries for r in d["reasons"])
        assert [store.get(None, approval_id).status for approval_id in forged] == ["approved", "approved"]
    finally:
        database.close()

    # A granted, in-constraint side effect is held; approved, its retry goes through exactly once.
    within = send(["bob@example.org"], "the numbers")
    held = post(gateway, "/v1/agents/authorize", token, within)
    assert held["effect"] == "require_approval" and held["approval_id"].startswith("apr_")
    assert admin_call(gateway, "POST", f"/approvals/{held['approval_id']}/approve").status_code == 200
    released = post(gateway, "/v1/agents/authorize", token, within)
    assert released["effect"] == "allow" and f"approved:{held['approval_id']}" in released["reasons"]
    assert post(gateway, "/v1/agents/authorize", token, within)["effect"] == "require_approval"
    assert gateway.cli("audit", "verify").returncode == 0


# Budgets over the chain -------------------------------------------------------------------------------------
def task_tree(gateways: list[Gateway], calls: int) -> list[str]:
    """Sub-task tokens under one root task with `budget.calls = calls`: four sub-tasks (exchanged at the
    gateways in turn) and a sub-sub-task. Each sub-task inherits the parent's budget in its own grant."""
    first = gateways[0]
    subject = first.token("emma", "tools=mail/*")
    root, _ = exchange(
        first,
        subject,
        first.token("planner", kind="agent"),
        {"tools": ["mail/read_inbox"], "budget": {"calls": calls}},
    )
    children = [
        exchange(gateways[i % len(gateways)], root, first.token(f"worker{i}", kind="agent"), {})[0]
        for i in range(4)
    ]
    grandchild, _ = exchange(gateways[-1], children[0], first.token("helper", kind="agent"), {})
    return [*children, grandchild]


def hammer(gateways: list[Gateway], tokens: list[str], rounds: int) -> list[str]:
    """Every token calls `rounds` times at every gateway, all at once; the effects."""

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            calls = [
                client.post(
                    f"{gateway.root_url}/v1/agents/authorize",
                    json=READ,
                    headers={"authorization": f"Bearer {token}"},
                )
                for _ in range(rounds)
                for gateway in gateways
                for token in tokens
            ]
            responses = await asyncio.gather(*calls)
        assert all(r.status_code == 200 for r in responses), [
            r.text for r in responses if r.status_code != 200
        ]
        return [str(r.json()["effect"]) for r in responses]

    return asyncio.run(main())


def test_sub_tasks_share_the_parent_call_budget(gateway: Gateway) -> None:
    tokens = task_tree([gateway], calls=2)
    effects = hammer([gateway], tokens, rounds=3)
    assert effects.count("allow") == 2 and len(effects) == 15  # not 2 per sub-task (that made 8 before)
    last = post(gateway, "/v1/agents/authorize", tokens[-1], READ)
    assert last["effect"] == "deny" and any("call budget of ancestor task" in r for r in last["reasons"])


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[Gateway]]:
    """Two gateways on one store and one Redis: sessions and call counters live in Redis."""
    env = {
        "ZTAI_STORE__REDIS_URL": redis_url_or_skip(),
        # Short lifetimes: the session keys this test leaves in Redis expire within two minutes.
        "ZTAI_AGENTS__SESSION_TTL_SECONDS": "60",
        "ZTAI_AGENTS__DEFAULT_TASK_TTL_SECONDS": "120",
        "ZTAI_AGENTS__MAX_TASK_TTL_SECONDS": "120",
    }
    first = start_gateway(tmp_path, extra_env=env)
    second = Gateway(first.home, free_port(), first.mock_port, first.env)
    try:
        second.start_server()
        yield [first, second]
    finally:
        second.close()
        first.close()


def test_replicas_sharing_redis_allow_exactly_the_parent_budget(replicas: list[Gateway]) -> None:
    tokens = task_tree(replicas, calls=3)
    effects = hammer(replicas, tokens, rounds=3)
    assert effects.count("allow") == 3 and len(effects) == 2 * 5 * 3
