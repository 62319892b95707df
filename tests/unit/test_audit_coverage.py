"""An audit log that cannot go quiet: every stored column is covered, a tampered frontier is caught,
checkpoints that cannot be written are loud (status, metric, alert event) and recover, and coverage is
read from the store. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import delete, select, update

from tests.unit.test_audit_log import _tamper, event
from ztai.audit import AuditLog, AuditWriter
from ztai.audit.log import canonical
from ztai.config import AuditSettings
from ztai.errors import CheckpointError
from ztai.store import AuditCheckpoint, AuditEvent, Database


@pytest.fixture
def audit_log(database: Database) -> AuditLog:
    return AuditLog(database, Ed25519PrivateKey.generate())


def _failures(reason: str) -> float:
    return REGISTRY.get_sample_value("ztai_audit_checkpoint_failures_total", {"reason": reason}) or 0.0


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("event_id", "evt_forged"),
        ("tenant", "other.org"),
        ("kind", "token.issued"),
        ("created_at", datetime(2020, 1, 1, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize("covered", [True, False])
def test_every_stored_column_is_covered_by_the_hash(
    audit_log: AuditLog, database: Database, column: str, value: object, covered: bool
) -> None:
    audit_log.append([event(i) for i in range(6)])
    if covered:
        audit_log.checkpoint()
    assert audit_log.verify().ok
    _tamper(database, update(AuditEvent).where(AuditEvent.seq == 4).values({column: value}))
    report = audit_log.verify()
    assert not report.ok and report.first_bad_seq == 4
    assert f"its stored {column} no longer matches the hashed event" in report.problem


def test_a_tampered_frontier_fails_verify_and_stops_checkpoints_loudly(
    audit_log: AuditLog, database: Database
) -> None:
    audit_log.append([event(i) for i in range(5)])
    audit_log.checkpoint()
    _tamper(database, update(AuditCheckpoint).values(frontier=bytes(32)))
    report = audit_log.verify()
    assert not report.ok and "stored frontier of the checkpoint at tree size 5 was altered" in report.problem
    audit_log.append([event(5)])
    with pytest.raises(CheckpointError) as failed:
        audit_log.checkpoint()
    assert failed.value.reason == "frontier_mismatch"


def test_a_frontier_of_the_wrong_shape_is_refused_even_when_its_root_matches(
    audit_log: AuditLog, database: Database
) -> None:
    audit_log.append([event(i) for i in range(6)])  # size 6: two subtrees (4 + 2)
    signed = audit_log.checkpoint()
    assert signed is not None
    _tamper(database, update(AuditCheckpoint).values(frontier=signed.root_hash))  # "the root" alone
    audit_log.append([event(6)])
    with pytest.raises(CheckpointError):
        audit_log.checkpoint()  # extending it would sign a wrong root
    assert "stored frontier" in audit_log.verify().problem
    assert audit_log.repair_frontiers() == [6]
    assert audit_log.checkpoint() is not None and audit_log.verify().ok


def test_repair_rewrites_only_frontiers_the_signed_roots_vouch_for(
    audit_log: AuditLog, database: Database
) -> None:
    for batch in range(3):
        audit_log.append([event(batch * 4 + i) for i in range(4)])
        audit_log.checkpoint()
    assert audit_log.repair_frontiers() == []
    _tamper(database, update(AuditCheckpoint).where(AuditCheckpoint.tree_size >= 8).values(frontier=b"x"))
    assert audit_log.repair_frontiers() == [8, 12]
    assert audit_log.verify().ok
    audit_log.append([event(12)])
    assert audit_log.checkpoint() is not None  # checkpoints resume
    body = canonical({**audit_log.event(2), "effect": "deny"})  # type: ignore[dict-item]
    _tamper(database, update(AuditEvent).where(AuditEvent.seq == 2).values(body=body))
    with pytest.raises(CheckpointError, match="do not reproduce the checkpoint at tree size 4"):
        audit_log.repair_frontiers()


def test_coverage_is_read_from_the_store(audit_log: AuditLog, database: Database) -> None:
    assert audit_log.coverage().problem(30) is None  # an empty log
    audit_log.append([event(i) for i in range(3)])
    audit_log.checkpoint()
    audit_log.append([event(3), event(4)])
    coverage = audit_log.coverage()
    assert (coverage.size, coverage.covered, coverage.uncovered) == (5, 3, 2)
    assert coverage.checkpoint_at is not None and coverage.oldest_uncovered_at is not None
    assert audit_log.verify().uncovered_since == coverage.oldest_uncovered_at
    assert coverage.problem(30) is None
    later = coverage.oldest_uncovered_at + timedelta(seconds=31)
    problem = coverage.problem(30, now=later)
    assert problem is not None and "2 events not covered by a signed checkpoint for 31s" in problem
    _tamper(database, delete(AuditEvent).where(AuditEvent.seq >= 2))
    problem = audit_log.coverage().problem(30)
    assert problem is not None and "covers 3 events but the log has 2" in problem


async def test_writer_reports_a_failing_checkpoint_and_recovers(
    audit_log: AuditLog, database: Database
) -> None:
    writer = AuditWriter(audit_log, checkpoint_interval=0.05, tenant="example.org")
    writer.start()
    try:
        await writer.record(event(0))
        await _wait_for(lambda: audit_log.coverage().uncovered == 0)
        with database.sessions() as session:
            good = session.execute(select(AuditCheckpoint.frontier)).scalar_one()
        before = _failures("frontier_mismatch")
        _tamper(database, update(AuditCheckpoint).values(frontier=bytes(32)))
        await writer.record(event(1))
        await _wait_for(lambda: writer.status() != "ok")
        assert "checkpoint failing" in writer.status() and "frontier" in writer.status()
        assert writer.healthy  # appends still work: requests are served, readiness says what fails
        assert _failures("frontier_mismatch") > before
        kinds = [e["kind"] for _, e in audit_log.tail(5)]
        assert kinds.count("audit.checkpoint_failed") == 1  # once per failure, not per attempt
        alert = next(e for _, e in audit_log.tail(5) if e["kind"] == "audit.checkpoint_failed")
        assert alert["reason"] == "frontier_mismatch" and alert["tenant"] == "example.org"
        _tamper(database, update(AuditCheckpoint).values(frontier=good))  # the cause is gone
        await _wait_for(lambda: writer.status() == "ok")
        await _wait_for(lambda: audit_log.coverage().uncovered == 0)
        assert "audit.checkpoint_recovered" in [e["kind"] for _, e in audit_log.tail(5)]
        gauge = REGISTRY.get_sample_value("ztai_audit_uncovered_events")
        assert gauge is not None
    finally:
        await asyncio.to_thread(writer.stop)
    assert audit_log.verify().ok


async def test_status_names_events_waiting_too_long_whoever_failed(audit_log: AuditLog) -> None:
    """Another worker appended and its checkpoints fail; this one checkpoints only every minute: the
    store still tells this worker's readiness that events wait too long."""
    writer = AuditWriter(audit_log, checkpoint_interval=60, max_uncovered_seconds=30)
    writer.start()
    try:
        await writer.record(event(0))
        audit_log.checkpoint()  # by another worker
        assert writer.status() == "ok"
        stale = event(1)
        stale["time"] = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
        audit_log.append([stale])  # as another worker would
        status = writer.status()
        assert "1 events not covered by a signed checkpoint" in status and "bound 30s" in status
    finally:
        await asyncio.to_thread(writer.stop)
    assert writer.status() != "ok"  # stopped: not ready


def test_max_uncovered_seconds_defaults_to_a_few_intervals_and_must_exceed_one() -> None:
    assert AuditSettings().uncovered_bound == 30
    assert AuditSettings(checkpoint_interval_seconds=20).uncovered_bound == 100
    assert AuditSettings(max_uncovered_seconds=9).uncovered_bound == 9
    with pytest.raises(ValidationError, match="longer than checkpoint_interval_seconds"):
        AuditSettings(max_uncovered_seconds=1)
