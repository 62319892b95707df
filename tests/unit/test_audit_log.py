"""The audit log on SQLite and PostgreSQL: appends, checkpoints, proofs, tamper detection, group commit."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, text, update

from ztai.audit import AuditLog, AuditWriter, merkle
from ztai.audit.events import new_event_id, now_iso
from ztai.audit.log import canonical
from ztai.audit.ocsf import OcsfFileExporter
from ztai.errors import AuditUnavailable
from ztai.store import AuditCheckpoint, AuditEvent, Database


def event(index: int = 0, effect: str = "allow") -> dict[str, object]:
    return {  # a decision record's shape (ztai.policy.decider)
        "id": new_event_id("dec"),
        "kind": "decision",
        "time": now_iso(),
        "tenant": "example.org",
        "principal": f"spiffe://example.org/user/u{index}",
        "action": "chat",
        "resource": "Model::mock",
        "effect": effect,
        "reasons": ["models-listed-in-token"],
        "errors": [],
        "obligations": [],
        "policy_revision": "rev",
        "request": {"route": "/chat/completions", "fingerprint": "00", "bytes": 10, "ip": "127.0.0.1"},
    }


@pytest.fixture
def audit_log(database: Database) -> AuditLog:
    return AuditLog(database, Ed25519PrivateKey.generate())


def b64(value: str) -> bytes:
    return base64.b64decode(value)


def test_appends_get_dense_indexes_and_checkpoints_sign_the_root(audit_log: AuditLog) -> None:
    assert audit_log.append([event(i) for i in range(5)]) == [0, 1, 2, 3, 4]
    assert audit_log.append([event(5)]) == [5]
    first = audit_log.checkpoint()
    assert first is not None and first.tree_size == 6
    assert audit_log.checkpoint() is None  # nothing new: no checkpoint
    audit_log.append([event(i) for i in range(6, 11)])
    second = audit_log.checkpoint()
    assert second is not None and second.previous_hash == first.hash
    report = audit_log.verify()
    assert report.ok, report.problem
    assert (report.events, report.checkpoints, report.uncovered) == (11, 2, 0)


def test_inclusion_and_consistency_proofs_verify_standalone(audit_log: AuditLog) -> None:
    audit_log.append([event(i) for i in range(7)])
    audit_log.checkpoint()
    audit_log.append([event(i) for i in range(7, 20)])
    audit_log.checkpoint()
    proof = audit_log.inclusion_proof(4)
    assert proof["tree_size"] == 7
    merkle.verify_inclusion(
        b64(proof["leaf_hash"]), 4, 7, [b64(h) for h in proof["proof"]], b64(proof["checkpoint"]["root_hash"])
    )
    assert merkle.hash_leaf(canonical(proof["event"])) == b64(proof["leaf_hash"])
    latest = audit_log.inclusion_proof(15)
    assert latest["tree_size"] == 20
    consistency = audit_log.consistency_proof(7, 20)
    merkle.verify_consistency(
        7,
        20,
        b64(consistency["old_root"]),
        b64(consistency["new_root"]),
        [b64(h) for h in consistency["proof"]],
    )
    with pytest.raises(LookupError):
        audit_log.consistency_proof(8, 20)


def _tamper(database: Database, statement: object) -> None:
    with database.engine.begin() as connection:
        connection.execute(statement)  # type: ignore[call-overload]


def test_altered_event_body_is_detected(audit_log: AuditLog, database: Database) -> None:
    audit_log.append([event(i) for i in range(10)])
    audit_log.checkpoint()
    forged = event(3, effect="deny")
    _tamper(database, update(AuditEvent).where(AuditEvent.seq == 3).values(body=canonical(forged)))
    report = audit_log.verify()
    assert not report.ok and report.first_bad_seq == 3 and "event 3" in report.problem


def test_altered_event_with_recomputed_leaf_hash_is_caught_by_the_checkpoint(
    audit_log: AuditLog, database: Database
) -> None:
    audit_log.append([event(i) for i in range(10)])
    audit_log.checkpoint()
    # The forger keeps the stored columns consistent (same id, tenant, kind, time): only the root tells.
    body = canonical({**audit_log.event(3), "effect": "deny"})  # type: ignore[dict-item]
    _tamper(
        database,
        update(AuditEvent).where(AuditEvent.seq == 3).values(body=body, leaf_hash=merkle.hash_leaf(body)),
    )
    report = audit_log.verify()
    assert not report.ok and "does not match its signed checkpoint" in report.problem


def test_removed_events_are_detected(audit_log: AuditLog, database: Database) -> None:
    audit_log.append([event(i) for i in range(10)])
    audit_log.checkpoint()
    _tamper(database, delete(AuditEvent).where(AuditEvent.seq == 9))
    report = audit_log.verify()
    assert not report.ok and "missing" in report.problem
    _tamper(database, delete(AuditEvent).where(AuditEvent.seq == 4))
    report = audit_log.verify()
    assert not report.ok and report.first_bad_seq == 4


def test_removed_or_altered_checkpoints_are_detected(audit_log: AuditLog, database: Database) -> None:
    for batch in range(3):
        audit_log.append([event(batch * 10 + i) for i in range(10)])
        audit_log.checkpoint()
    _tamper(database, update(AuditCheckpoint).where(AuditCheckpoint.tree_size == 20).values(tree_size=19))
    report = audit_log.verify()
    assert not report.ok and "bad signature" in report.problem
    _tamper(database, update(AuditCheckpoint).where(AuditCheckpoint.tree_size == 19).values(tree_size=20))
    assert audit_log.verify().ok
    _tamper(database, delete(AuditCheckpoint).where(AuditCheckpoint.tree_size == 20))
    report = audit_log.verify()
    assert not report.ok and "chain" in report.problem


def test_checkpoint_signed_by_another_key_is_rejected(database: Database) -> None:
    honest = AuditLog(database, Ed25519PrivateKey.generate())
    forger = AuditLog(database, Ed25519PrivateKey.generate())
    honest.append([event(1)])
    forger.checkpoint()
    report = honest.verify()
    assert not report.ok and "signature" in report.problem


def test_events_after_the_last_checkpoint_are_reported_as_uncovered(audit_log: AuditLog) -> None:
    audit_log.append([event(1), event(2)])
    audit_log.checkpoint()
    audit_log.append([event(3)])
    report = audit_log.verify()
    assert report.ok and report.uncovered == 1 and report.notes


async def test_group_commit_writer_batches_and_exports_ocsf(audit_log: AuditLog, tmp_path: Path) -> None:
    exporter = OcsfFileExporter(tmp_path / "audit.ocsf.jsonl")
    writer = AuditWriter(audit_log, batch_max=64, checkpoint_interval=60, exporter=exporter)
    writer.start()
    try:
        seqs = await asyncio.gather(*[writer.record(event(i)) for i in range(300)])
    finally:
        await asyncio.to_thread(writer.stop)
    assert sorted(seqs) == list(range(300))
    assert writer.batches < 300  # many events shared a commit
    report = audit_log.verify()
    assert report.ok and report.events == 300 and report.uncovered == 0  # stop() wrote a final checkpoint
    lines = (tmp_path / "audit.ocsf.jsonl").read_text().splitlines()
    assert len(lines) == 300
    assert '"class_uid":6003' in lines[0]


async def test_writer_fails_closed_when_the_store_refuses_writes(
    audit_log: AuditLog, database: Database
) -> None:
    writer = AuditWriter(audit_log, checkpoint_interval=60)
    writer.start()
    try:
        await writer.record(event(0))
        with database.engine.begin() as connection:
            connection.execute(text("DROP TABLE audit_events"))
        with pytest.raises(AuditUnavailable):
            await writer.record(event(1))
        assert not writer.healthy
    finally:
        await asyncio.to_thread(writer.stop)
