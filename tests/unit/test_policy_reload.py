"""Policy reloads across workers: requests in the store, each worker swapping atomically or refusing."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import redis_url_or_skip
from ztai.audit import AuditLog
from ztai.config import Settings
from ztai.gateway.policy_watch import PolicyWatcher
from ztai.identity import KeyStore
from ztai.policy import PolicyEngine, Request, model_entities
from ztai.policy.context import principal_context
from ztai.policy.engine import DEFAULTS_DIR
from ztai.policy.reloads import APPLIED, POLICY_CHANNEL, REFUSED, PolicyReloads, ReloadRequest, reload_event
from ztai.store import Database
from ztai.store.shared import publish_once

FORBID_CHAT = '@id("no-chat")\nforbid (principal, action == Action::"chat", resource);\n'


class RecordedAudit:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def record(self, event: dict[str, Any]) -> int:
        self.events.append(event)
        return len(self.events) - 1


def chat(engine: PolicyEngine) -> str:
    claims = {"models": ["mock"]}
    context = principal_context(
        "example.org", "user", claims, "iss", ip="127.0.0.1", route="/chat/completions"
    )
    request = Request("User", "spiffe://example.org/user/alice", "chat", "Model", "mock", context)
    return engine.decide(request).effect


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULTS_DIR, tmp_path / "policies", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "policies"


def watcher(engine: PolicyEngine, database: Database, audit: RecordedAudit) -> PolicyWatcher:
    return PolicyWatcher(
        engine,
        PolicyReloads(database),
        audit,  # type: ignore[arg-type]
        tenant="example.org",
        principal="spiffe://example.org/service/ztai",
        poll_seconds=60,
    )


def test_requests_are_recorded_in_order(database: Database) -> None:
    reloads = PolicyReloads(database)
    assert reloads.latest() is None
    first = reloads.request("aaaa", "cli")
    second = reloads.request("bbbb", "SIGHUP")
    assert second.id > first.id and reloads.latest() == ReloadRequest(second.id, "bbbb")


async def test_a_requested_revision_is_swapped_in_once(policy_dir: Path, database: Database) -> None:
    engine = PolicyEngine(policy_dir, model_entities([("mock", "mock")]))
    audit = RecordedAudit()
    watch = watcher(engine, database, audit)
    old = engine.revision
    assert chat(engine) == "allow"
    (policy_dir / "zz.cedar").write_text(FORBID_CHAT)
    new = engine.load().revision  # what the CLI validated
    request = PolicyReloads(database).request(new, "cli")
    assert await watch.check() is True
    assert engine.revision == new and chat(engine) == "deny"
    [event] = audit.events
    assert event["kind"] == APPLIED and event["reload"] == {
        "id": request.id, "revision": new, "previous": old, "worker": event["reload"]["worker"]
    }  # fmt: skip
    assert await watch.check() is False  # handled already: nothing loads again
    assert len(audit.events) == 1


async def test_an_invalid_set_is_refused_and_the_old_one_stays(policy_dir: Path, database: Database) -> None:
    engine = PolicyEngine(policy_dir, model_entities([("mock", "mock")]))
    audit = RecordedAudit()
    watch = watcher(engine, database, audit)
    active = engine.bundle
    (policy_dir / "zz.cedar").write_text('permit (principal, action == Action::"nope", resource);')
    PolicyReloads(database).request("0123456789abcdef", "cli")
    assert await watch.check() is True
    assert engine.bundle is active and chat(engine) == "allow"
    [event] = audit.events
    assert event["kind"] == REFUSED and event["effect"] == "deny" and "nope" in event["reasons"][0]
    assert watch.last_problem == event["reasons"][0]


async def test_a_directory_changed_since_validation_is_refused(policy_dir: Path, database: Database) -> None:
    engine = PolicyEngine(policy_dir, model_entities([("mock", "mock")]))
    audit = RecordedAudit()
    watch = watcher(engine, database, audit)
    (policy_dir / "zz.cedar").write_text(FORBID_CHAT)
    validated = engine.load().revision
    (policy_dir / "zz.cedar").write_text(FORBID_CHAT + "// edited after validation\n")
    PolicyReloads(database).request(validated, "cli")
    await watch.check()
    assert chat(engine) == "allow"  # still the old set: the new one is not what was validated
    assert audit.events[0]["kind"] == REFUSED and "not the requested" in audit.events[0]["reasons"][0]


async def test_requests_older_than_the_workers_start_are_not_replayed(
    policy_dir: Path, database: Database
) -> None:
    PolicyReloads(database).request("0123456789abcdef", "cli")
    engine = PolicyEngine(policy_dir, model_entities([("mock", "mock")]))
    audit = RecordedAudit()
    latest = PolicyReloads(database).latest()
    assert latest is not None
    watch = PolicyWatcher(
        engine,
        PolicyReloads(database),
        audit,  # type: ignore[arg-type]
        tenant="example.org",
        principal="spiffe://example.org/service/ztai",
        poll_seconds=60,
        seen=latest.id,
    )
    assert await watch.check() is False and audit.events == []


async def test_sighup_validates_records_and_applies_in_this_process(
    policy_dir: Path, database: Database
) -> None:
    engine = PolicyEngine(policy_dir, model_entities([("mock", "mock")]))
    audit = RecordedAudit()
    watch = watcher(engine, database, audit)
    (policy_dir / "zz.cedar").write_text('permit (principal, action == Action::"nope", resource);')
    await watch.request_local("SIGHUP")
    assert PolicyReloads(database).latest() is None  # invalid: nothing requested
    assert audit.events[-1]["kind"] == REFUSED
    (policy_dir / "zz.cedar").write_text(FORBID_CHAT)
    await watch.request_local("SIGHUP")
    latest = PolicyReloads(database).latest()
    assert latest is not None and latest.revision == engine.load().revision
    assert await watch.check() is True and chat(engine) == "deny"


async def test_a_redis_notice_wakes_the_worker_before_its_next_poll(
    policy_dir: Path, database: Database
) -> None:
    url = redis_url_or_skip()
    engine = PolicyEngine(policy_dir, model_entities([("mock", "mock")]))
    audit = RecordedAudit()
    watch = PolicyWatcher(
        engine,
        PolicyReloads(database),
        audit,  # type: ignore[arg-type]
        tenant="example.org",
        principal="spiffe://example.org/service/ztai",
        poll_seconds=3600,  # only the notice can make it look
        redis_url=url,
    )
    watch.start()
    try:
        assert watch._channel is not None
        await asyncio.wait_for(watch._channel.subscribed.wait(), 10)
        (policy_dir / "zz.cedar").write_text(FORBID_CHAT)
        PolicyReloads(database).request(engine.load().revision, "cli")
        assert publish_once(url, POLICY_CHANNEL, b'{"v": 1, "id": 1}')
        for _ in range(200):
            if audit.events:
                break
            await asyncio.sleep(0.05)
        assert [e["kind"] for e in audit.events] == [APPLIED] and chat(engine) == "deny"
    finally:
        await watch.close()


def test_outcomes_are_found_by_request_after_a_point_of_the_log(
    database: Database, settings: Settings
) -> None:
    keys = KeyStore.load(settings.data_path)
    log = AuditLog(database, keys.audit.private_key)
    reloads = PolicyReloads(database)
    assert reloads.next_audit_seq() == 0
    request = reloads.request("aaaa", "cli")
    older = reload_event(APPLIED, tenant="t", principal="p", request=request, revision="aaaa", previous="b")
    log.append([older])
    after = reloads.next_audit_seq()
    assert after == 1
    other = ReloadRequest(request.id + 1, "cccc")
    events = [
        reload_event(APPLIED, tenant="t", principal="p", request=request, revision="aaaa", previous="b"),
        reload_event(
            REFUSED, tenant="t", principal="p", request=request, revision="aaaa", previous="b", problem="x"
        ),
        reload_event(APPLIED, tenant="t", principal="p", request=other, revision="cccc", previous="b"),
    ]
    log.append(events)
    found = reloads.outcomes(request.id, after)
    assert [e["id"] for e in found] == [events[0]["id"], events[1]["id"]]
