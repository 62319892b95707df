"""Approvals of held tool calls: the store (SQLite and PostgreSQL), call hashes, previews, events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from ztai.agents.approvals import (
    APPROVAL_ID,
    PREVIEW_CHARS,
    ApprovalStore,
    approval_event,
    approval_json,
    call_hash,
    preview,
)
from ztai.errors import Conflict, MalformedRequest, NotFound, SelfApproval
from ztai.store import Approval, Database

KEY = b"k" * 32
AGENT = "spiffe://example.org/agent/mailer"
ADMIN = "spiffe://example.org/user/ops"


class Clock:
    """A clock the tests move forward by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(database: Database, clock: Clock) -> ApprovalStore:
    return ApprovalStore(database, clock=clock)


def hold(
    store: ApprovalStore,
    *,
    tenant: str = "example.org",
    task: str = "tsk_0123456789abcdef",
    arguments: dict[str, Any] | None = None,
    ttl: int = 600,
) -> Approval:
    arguments = arguments if arguments is not None else {"to": "bob@corp.example", "body": "hi"}
    return store.request(
        tenant=tenant,
        task_id=task,
        principal=AGENT,
        server="mail",
        tool="send",
        call_hash=call_hash(KEY, "mail", "send", arguments),
        preview=preview(arguments),
        reasons=["agents-untrusted-sensitive", "taint:web"],
        decision_id="dec_0001",
        ttl_seconds=ttl,
    )


def consume(store: ApprovalStore, approval: Approval) -> str | None:
    return store.consume(tenant=approval.tenant, task_id=approval.task_id, call_hash=approval.call_hash)


def stored_status(database: Database, approval_id: str) -> str:
    with database.sessions() as session:
        return session.scalars(select(Approval.status).where(Approval.id == approval_id)).one()


# The store ----------------------------------------------------------------------------------------
def test_request_creates_one_pending_approval_per_call(store: ApprovalStore, clock: Clock) -> None:
    first = hold(store)
    assert APPROVAL_ID.fullmatch(first.id)
    assert first.status == "pending"
    clock.advance(1)
    assert hold(store).id == first.id  # the agent retrying the held call gets the same approval
    other_arguments = hold(store, arguments={"to": "eve@evil.example", "body": "hi"})
    clock.advance(1)
    other_task = hold(store, task="tsk_fedcba9876543210")
    assert len({first.id, other_arguments.id, other_task.id}) == 3
    newest_first = [other_task.id, other_arguments.id, first.id]
    assert [row.id for row in store.list("example.org")] == newest_first
    assert [row.id for row in store.list("example.org", limit=2)] == newest_first[:2]


def test_approved_call_is_consumed_exactly_once(store: ApprovalStore) -> None:
    approval = hold(store)
    assert consume(store, approval) is None  # pending: nothing to consume
    decided = store.decide("example.org", approval.id, True, ADMIN)
    assert (decided.status, decided.decided_by) == ("approved", ADMIN)
    assert decided.decided_at is not None
    assert hold(store).id == approval.id  # approved and unused: still the call's approval
    assert consume(store, approval) == approval.id
    assert consume(store, approval) is None  # one approval, one call
    assert store.get("example.org", approval.id).status == "used"
    assert [row.id for row in store.list("example.org", "used")] == [approval.id]
    assert hold(store).id != approval.id  # the next identical call needs a new approval


def test_denied_call_is_not_consumable_and_asks_again(store: ApprovalStore) -> None:
    approval = hold(store)
    assert store.decide("example.org", approval.id, False, ADMIN).status == "denied"
    assert consume(store, approval) is None
    assert [row.id for row in store.list("example.org", "denied")] == [approval.id]
    assert store.list("example.org", "pending") == []
    retry = hold(store)
    assert retry.id != approval.id and retry.status == "pending"


def test_deciding_twice_is_a_conflict(store: ApprovalStore) -> None:
    approval = hold(store)
    store.decide("example.org", approval.id, True, ADMIN)
    for approve in (True, False):
        with pytest.raises(Conflict) as caught:
            store.decide("example.org", approval.id, approve, ADMIN)
        assert caught.value.status == 409
        assert caught.value.code == "approval_decided"
        assert "already approved" in caught.value.message
    assert store.get("example.org", approval.id).status == "approved"


def test_expired_approvals_are_reported_not_rewritten(
    store: ApprovalStore, database: Database, clock: Clock
) -> None:
    pending = hold(store, ttl=60)
    approved = hold(store, task="tsk_fedcba9876543210", ttl=60)
    store.decide("example.org", approved.id, True, ADMIN)
    clock.advance(61)
    assert store.list("example.org", "pending") == []
    assert store.list("example.org", "approved") == []
    expired = store.list("example.org", "expired")
    assert {row.id for row in expired} == {pending.id, approved.id}
    assert {row.status for row in expired} == {"expired"}
    assert store.get("example.org", pending.id).status == "expired"
    assert stored_status(database, pending.id) == "pending"  # reading changed nothing
    assert consume(store, approved) is None  # too late to use it
    with pytest.raises(Conflict) as caught:
        store.decide("example.org", pending.id, True, ADMIN)
    assert caught.value.code == "approval_expired"
    assert hold(store, ttl=60).id != pending.id  # the retried call asks afresh


def test_tenants_see_and_decide_only_their_own(store: ApprovalStore) -> None:
    ours = hold(store, tenant="example.org")
    theirs = hold(store, tenant="other.org")
    assert [row.id for row in store.list("example.org")] == [ours.id]
    assert [row.id for row in store.list("other.org")] == [theirs.id]
    assert {row.id for row in store.list(None)} == {ours.id, theirs.id}
    with pytest.raises(NotFound):
        store.get("example.org", theirs.id)
    with pytest.raises(NotFound):
        store.decide("example.org", theirs.id, True, ADMIN)
    assert store.get("other.org", theirs.id).status == "pending"
    store.decide("other.org", theirs.id, True, "spiffe://other.org/user/ops")
    wrong_tenant = store.consume(tenant="example.org", task_id=theirs.task_id, call_hash=theirs.call_hash)
    assert wrong_tenant is None
    assert consume(store, theirs) == theirs.id


def test_the_held_principal_cannot_decide_its_own_call(store: ApprovalStore) -> None:
    approval = hold(store)
    with pytest.raises(SelfApproval) as caught:
        store.decide(None, approval.id, True, AGENT)
    assert caught.value.status == 403
    assert store.get(None, approval.id).status == "pending"


def test_bad_input_is_refused(store: ApprovalStore) -> None:
    with pytest.raises(NotFound):
        store.get(None, "apr_../../etc")
    with pytest.raises(NotFound):
        store.decide(None, "apr_" + "0" * 24, True, ADMIN)
    with pytest.raises(MalformedRequest):
        store.list(None, "maybe")
    with pytest.raises(MalformedRequest):
        store.list(None, "all", limit=0)
    with pytest.raises(MalformedRequest):
        store.list(None, "all", limit=100_000)
    with pytest.raises(MalformedRequest):
        hold(store, task="")
    with pytest.raises(MalformedRequest):
        hold(store, ttl=0)
    with pytest.raises(MalformedRequest):
        store.request(
            tenant="example.org",
            task_id="tsk_0123456789abcdef",
            principal=AGENT,
            server="mail",
            tool="send",
            call_hash="not-a-hash",
            preview="",
            reasons=[],
            decision_id="dec_1",
            ttl_seconds=60,
        )


def test_reasons_are_bounded_to_the_column(store: ApprovalStore) -> None:
    approval = store.request(
        tenant="example.org",
        task_id="tsk_0123456789abcdef",
        principal=AGENT,
        server="mail",
        tool="send",
        call_hash="ab" * 32,
        preview="x" * 5000,
        reasons=["r" * 500] * 100,
        decision_id="dec_1",
        ttl_seconds=60,
    )
    document = approval_json(store.get(None, approval.id))
    assert len(approval.reasons) <= 4000
    assert document["reasons"] and all(len(reason) == 200 for reason in document["reasons"])
    assert len(document["preview"]) == 2000


def race(workers: int, work: Callable[[], Any]) -> list[Any]:
    """Run `work` on `workers` threads released together; their results."""
    barrier = threading.Barrier(workers)
    results: list[Any] = [None] * workers

    def run(index: int) -> None:
        barrier.wait()
        results[index] = work()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_racing_consumers_get_one_approval_once(store: ApprovalStore) -> None:
    for round_ in range(8):
        approval = hold(store, task=f"tsk_{round_:016x}")
        store.decide("example.org", approval.id, True, ADMIN)
        results = race(4, lambda approval=approval: consume(store, approval))  # type: ignore[misc]
        assert results.count(approval.id) == 1 and results.count(None) == 3


def test_racing_requests_for_one_call_make_one_approval(store: ApprovalStore) -> None:
    for round_ in range(5):
        task = f"tsk_{round_:016x}"
        ids = race(4, lambda task=task: hold(store, task=task).id)  # type: ignore[misc]
        assert len(set(ids)) == 1
    assert len(store.list("example.org")) == 5


# Call identity, previews, events -------------------------------------------------------------------
def test_call_hash_is_keyed_and_canonical() -> None:
    base = call_hash(KEY, "mail", "send", {"to": "a@b.example", "cc": ["x", "y"], "n": 1})
    assert len(base) == 64 and int(base, 16) >= 0
    assert call_hash(KEY, "mail", "send", {"n": 1, "cc": ["x", "y"], "to": "a@b.example"}) == base
    assert call_hash(b"another key", "mail", "send", {"to": "a@b.example", "cc": ["x", "y"], "n": 1}) != base
    assert call_hash(KEY, "mail", "send", {"to": "a@b.example", "cc": ["y", "x"], "n": 1}) != base
    assert call_hash(KEY, "mail", "draft", {"to": "a@b.example", "cc": ["x", "y"], "n": 1}) != base
    with pytest.raises(MalformedRequest):
        call_hash(KEY, "mail", "send", {"when": object()})


def test_preview_shows_shape_and_destinations_not_values() -> None:
    text = preview(
        {
            "to": "alice.smith@corp.example",
            "url": "https://User:Secret@Evil.Example:8443/path?q=token",
            "body": "see http://files.example/x and mail carol@partner.example, api key sk-live-123",
            "cc": ["dave@corp.example", "erin@corp.example", 3, None],
            "urgent": True,
            "amount": 1200.5,
            "meta": {"depth": {"deeper": {"deepest": "secret value"}}},
        }
    )
    assert "email(@corp.example)" in text
    assert "url(https://evil.example)" in text
    assert "urls[files.example]" in text and "emails[@partner.example]" in text
    assert "urgent: true" in text and "amount: float" in text
    assert "list(4)[email(@corp.example), email(@corp.example), int, …]" in text
    for secret in ("alice", "Secret", "token", "carol", "sk-live", "1200", "secret value", "dave", "path"):
        assert secret not in text


def test_preview_is_bounded() -> None:
    text = preview({f"argument{index}": "x" * 10_000 for index in range(50)})
    assert len(text) <= PREVIEW_CHARS
    assert preview({"a" * 500: 1}).startswith("a" * 39 + "…")
    assert preview("just a string") == "str(13)"


def test_event_and_json_describe_the_approval(store: ApprovalStore) -> None:
    approval = store.decide("example.org", hold(store).id, False, ADMIN)
    event = approval_event(approval, by=ADMIN, note="unknown recipient", via="api")
    assert event["kind"] == "approval.denied" and event["principal"] == ADMIN
    assert event["approval_id"] == approval.id and event["requested_by"] == AGENT
    assert event["tenant"] == "example.org" and event["note"] == "unknown recipient"
    document = approval_json(approval)
    assert set(document) == {
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
    assert document["reasons"] == ["agents-untrusted-sensitive", "taint:web"]
    assert datetime.fromisoformat(document["expires_at"]).tzinfo is not None
