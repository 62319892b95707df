"""End to end: held tool calls listed and decided through the real gateway's admin API and `ztai approvals`."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from tests.e2e.conftest import Gateway
from ztai.agents.approvals import ApprovalStore, call_hash, preview
from ztai.config import load_settings
from ztai.store import AuditEvent, Database, open_database

pytestmark = pytest.mark.e2e
AGENT = "spiffe://example.org/agent/mailer"
FIELDS = {
    "id",
    "status",
    "task",
    "principal",
    "server",
    "tool",
    "preview",
    "reasons",
    "decision_id",
    "created_at",
    "expires_at",
    "decided_at",
    "decided_by",
}


def gateway_database(gateway: Gateway) -> Database:
    """The store the gateway serves from (its configured URL, or the SQLite file in its data dir)."""
    url = gateway.env.get("ZTAI_STORE__URL") or load_settings(gateway.config).store_url
    return open_database(url)


def hold_call(database: Database, *, tenant: str = "example.org", task: str = "tsk_00000000000000aa") -> str:
    """What the agent guard does when policy holds a call: a pending approval, returned by id."""
    arguments = {"to": "bob@partner.example", "body": "the quarterly numbers"}
    approval = ApprovalStore(database).request(
        tenant=tenant,
        task_id=task,
        principal=AGENT,
        server="mail",
        tool="send",
        call_hash=call_hash(b"e2e key", "mail", "send", arguments),
        preview=preview(arguments),
        reasons=["agents-untrusted-sensitive"],
        decision_id="dec_e2e",
        ttl_seconds=600,
    )
    return approval.id


def admin_api(gateway: Gateway, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{gateway.root_url}/admin/approvals{path}",
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
        **kwargs,
    )


def audit_events(database: Database, kind: str) -> list[dict[str, Any]]:
    with database.sessions() as session:
        bodies = session.scalars(select(AuditEvent.body).where(AuditEvent.kind == kind)).all()
    return [orjson.loads(body) for body in bodies]


def test_admin_api_lists_and_decides_approvals(gateway_on_each_store: Gateway) -> None:
    gateway = gateway_on_each_store
    database = gateway_database(gateway)
    try:
        ours = hold_call(database)
        other = hold_call(database, task="tsk_00000000000000bb")
        foreign = hold_call(database, tenant="other.org")
        admin = gateway.token("ops", "roles=admin")
        user = gateway.token("alice", "models=mock")

        listed = admin_api(gateway, "GET", "", admin)
        assert listed.status_code == 200, listed.text
        data = listed.json()["data"]
        assert {item["id"] for item in data} == {ours, other}  # not the other tenant's
        assert set(data[0]) == FIELDS
        first = next(item for item in data if item["id"] == ours)
        assert first["status"] == "pending" and first["principal"] == AGENT
        assert (first["server"], first["tool"], first["task"]) == ("mail", "send", "tsk_00000000000000aa")
        assert first["preview"] == "to: email(@partner.example), body: str(21)"
        assert first["reasons"] == ["agents-untrusted-sensitive"]

        shown = admin_api(gateway, "GET", f"/{ours}", admin)
        assert shown.status_code == 200 and shown.json()["id"] == ours
        assert admin_api(gateway, "GET", f"/{foreign}", admin).status_code == 404
        assert admin_api(gateway, "GET", "?status=bogus", admin).status_code == 422

        refused = admin_api(gateway, "POST", f"/{ours}/approve", user)
        assert refused.status_code == 403
        assert refused.json()["error"]["decision_id"].startswith("dec_")
        assert admin_api(gateway, "GET", "", user).status_code == 403
        assert admin_api(gateway, "GET", "", "not-a-token").status_code == 401

        approved = admin_api(
            gateway, "POST", f"/{ours}/approve", admin, json={"note": "checked the recipient"}
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "approved"
        assert approved.json()["decided_by"] == "spiffe://example.org/user/ops"
        again = admin_api(gateway, "POST", f"/{ours}/deny", admin)
        assert again.status_code == 409 and again.json()["error"]["code"] == "approval_decided"
        assert admin_api(gateway, "POST", f"/{foreign}/approve", admin).status_code == 404
        denied = admin_api(gateway, "POST", f"/{other}/deny", admin, content=b"")
        assert denied.status_code == 200 and denied.json()["status"] == "denied"
        bad_note = admin_api(gateway, "POST", f"/{foreign}/deny", admin, json={"note": 5})
        assert bad_note.status_code == 422

        # The agent's retry consumes the approval once; the API then reports it used.
        store = ApprovalStore(database)
        approval = store.get(None, ours)
        assert (
            store.consume(tenant="example.org", task_id=approval.task_id, call_hash=approval.call_hash)
            == ours
        )
        used = admin_api(gateway, "GET", "?status=used", admin).json()["data"]
        assert [item["id"] for item in used] == [ours]
        everything = admin_api(gateway, "GET", "?status=all", admin).json()["data"]
        assert {item["status"] for item in everything} == {"used", "denied"}
        assert store.get(None, foreign).status == "pending"  # untouched by the other tenant's admin

        [event] = audit_events(database, "approval.approved")
        assert event["approval_id"] == ours and event["note"] == "checked the recipient"
        assert event["principal"] == "spiffe://example.org/user/ops" and event["via"] == "api"
        assert [e["approval_id"] for e in audit_events(database, "approval.denied")] == [other]
    finally:
        database.close()


def test_cli_lists_approves_and_denies(gateway: Gateway) -> None:
    database = gateway_database(gateway)
    try:
        first = hold_call(database, task="tsk_00000000000000c1")
        second = hold_call(database, task="tsk_00000000000000c2")
    finally:
        database.close()

    lines = gateway.cli("approvals", "list", "--json").stdout.splitlines()
    listed = {item["id"]: item for item in map(orjson.loads, lines)}
    assert {first, second} <= set(listed)
    assert listed[first]["tenant"] == "example.org" and listed[first]["status"] == "pending"
    table = gateway.cli("approvals", "list").stdout
    assert first in table and "mail/send" in table

    approved = gateway.cli("approvals", "approve", first, "--by", "ops-bob", "--note", "known recipient")
    assert f"approved {first}" in approved.stderr
    denied = gateway.cli("approvals", "deny", second)
    assert f"denied {second}" in denied.stderr

    twice = gateway.cli("approvals", "deny", first, check=False)
    assert twice.returncode != 0 and "already approved" in twice.stderr
    missing = gateway.cli("approvals", "approve", "apr_000000000000000000000000", check=False)
    assert missing.returncode != 0 and "no approval" in missing.stderr

    by_status = {
        status: {item["id"]: item for item in map(orjson.loads, gateway.cli(*args).stdout.splitlines())}
        for status, args in {
            "approved": ("approvals", "list", "--status", "approved", "--json"),
            "denied": ("approvals", "list", "--status", "denied", "--json"),
        }.items()
    }
    assert by_status["approved"][first]["decided_by"] == "ops-bob"
    assert by_status["denied"][second]["decided_by"].startswith("cli")
    nothing = gateway.cli("approvals", "list", "--status", "expired")
    assert "no approvals with status expired" in nothing.stderr

    # The running gateway sees the CLI's decisions, and the audit log holds both, intact.
    admin = gateway.token("ops", "roles=admin")
    shown = admin_api(gateway, "GET", f"/{first}", admin).json()
    assert (shown["status"], shown["decided_by"]) == ("approved", "ops-bob")
    events = [
        orjson.loads(line) for line in gateway.cli("audit", "tail", "-n", "50", "--json").stdout.splitlines()
    ]
    decisions = {e["approval_id"]: e for e in events if e["kind"].startswith("approval.")}
    assert decisions[first]["kind"] == "approval.approved" and decisions[first]["via"] == "cli"
    assert decisions[first]["note"] == "known recipient"
    assert decisions[second]["kind"] == "approval.denied"
    gateway.cli("audit", "verify")
