"""Witnesses: checkpoints delivered to a file and an HTTP endpoint (retried, never blocking), read back,
and `verify(witnessed=...)` catching what the database alone cannot: deleted newest checkpoints and
events, replaced checkpoints, a diverging log. On SQLite and PostgreSQL where the store matters."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY
from sqlalchemy import delete

from tests.unit.test_audit_log import _tamper, event
from ztai.audit import AuditLog, AuditWriter, Checkpoint
from ztai.audit.ocsf import OcsfFileExporter
from ztai.audit.witness import (
    FileWitness,
    HttpWitness,
    WitnessExporter,
    read_witness_file,
    witness_record,
)
from ztai.store import AuditCheckpoint, AuditEvent, Database, open_database


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def audit_log(database: Database, key: Ed25519PrivateKey) -> AuditLog:
    return AuditLog(database, key)


def _grow(audit_log: AuditLog, batches: int, size: int = 5) -> list[Checkpoint]:
    signed = []
    for batch in range(batches):
        audit_log.append([event(batch * size + i) for i in range(size)])
        checkpoint = audit_log.checkpoint()
        assert checkpoint is not None
        signed.append(checkpoint)
    return signed


def test_checkpoint_json_round_trips(audit_log: AuditLog) -> None:
    (checkpoint,) = _grow(audit_log, 1)
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    with pytest.raises(ValueError):
        Checkpoint.from_json({**checkpoint.to_json(), "root_hash": "not base64!"})


def test_deleting_the_newest_checkpoints_and_events_is_caught_only_with_the_witness(
    audit_log: AuditLog, database: Database
) -> None:
    witnessed = _grow(audit_log, 4)  # checkpoints at 5, 10, 15, 20
    _tamper(database, delete(AuditCheckpoint).where(AuditCheckpoint.tree_size > 10))
    _tamper(database, delete(AuditEvent).where(AuditEvent.seq >= 10))
    assert audit_log.verify().ok  # what is left is a consistent, shorter log
    report = audit_log.verify(witnessed=witnessed)
    assert not report.ok
    assert "the witness holds a checkpoint of tree size 20" in report.problem
    assert "the log has only 10 events" in report.problem and "deleted" in report.problem


def test_deleting_the_newest_checkpoints_only_is_caught_with_the_witness(
    audit_log: AuditLog, database: Database
) -> None:
    witnessed = _grow(audit_log, 3)
    _tamper(database, delete(AuditCheckpoint).where(AuditCheckpoint.tree_size == 15))
    assert audit_log.verify().ok  # the last 5 events now merely look uncovered
    report = audit_log.verify(witnessed=witnessed)
    assert not report.ok and "missing from the store" in report.problem and "tree size 15" in report.problem


def test_a_log_rewritten_after_truncation_diverges_from_the_witness(
    audit_log: AuditLog, database: Database
) -> None:
    """Truncate, append other events, checkpoint again (with the stolen key or a running server)."""
    witnessed = _grow(audit_log, 3)
    _tamper(database, delete(AuditCheckpoint).where(AuditCheckpoint.tree_size > 5))
    _tamper(database, delete(AuditEvent).where(AuditEvent.seq >= 5))
    _grow(audit_log, 2)  # new events at 5..14, new checkpoints at 10 and 15
    assert audit_log.verify().ok
    report = audit_log.verify(witnessed=witnessed)
    assert (
        not report.ok
        and "the stored checkpoint at tree size 10 differs from the witnessed one" in report.problem
    )
    report = audit_log.verify(witnessed=witnessed[:1])  # the prefix both logs share
    assert report.ok and report.witnessed == 1


def test_a_witnessed_root_the_stored_events_do_not_reach_is_caught(
    audit_log: AuditLog, database: Database, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """The witness saw a tree size the store never checkpointed; its root must match the events."""
    other_store = open_database(f"sqlite:///{tmp_path / 'other.db'}")
    other_store.migrate()
    foreign = _grow(AuditLog(other_store, key), 1, size=7)  # size 7 over other events, same key
    other_store.close()
    _grow(audit_log, 2)
    report = audit_log.verify(witnessed=foreign)
    assert not report.ok and "does not match the witnessed checkpoint" in report.problem


def test_witnessed_checkpoints_must_be_signed_by_the_log_key(audit_log: AuditLog, database: Database) -> None:
    stranger = AuditLog(database, Ed25519PrivateKey.generate())
    _grow(audit_log, 1)
    audit_log.append([event(9)])
    forged = stranger.checkpoint()
    assert forged is not None
    _tamper(database, delete(AuditCheckpoint).where(AuditCheckpoint.tree_size == 6))
    report = audit_log.verify(witnessed=[forged])
    assert not report.ok and "bad signature" in report.problem


def test_a_lagging_witness_is_a_note_not_a_failure(audit_log: AuditLog) -> None:
    witnessed = _grow(audit_log, 3)[:2]
    report = audit_log.verify(witnessed=witnessed)
    assert report.ok and report.witnessed == 2
    assert "1 newest stored checkpoints are not in the witness yet" in report.notes


def test_file_witness_appends_lines_that_read_back(audit_log: AuditLog, tmp_path: Path) -> None:
    path = tmp_path / "witness" / "checkpoints.jsonl"
    signed = _grow(audit_log, 3)
    witness = FileWitness(path)
    for checkpoint in signed:
        witness.send(witness_record(checkpoint))
    found = read_witness_file(path)
    assert found.checkpoints == signed and not found.skipped
    assert audit_log.verify(witnessed=found.checkpoints).ok


def test_a_truncated_or_corrupt_witness_file_is_reported_not_fatal(
    audit_log: AuditLog, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoints.jsonl"
    signed = _grow(audit_log, 2)
    lines = [witness_record(c) for c in signed]
    path.write_bytes(lines[0] + b"\n" + b'{"oops": 1}\n[1, 2]\n\n' + lines[1][: len(lines[1]) // 2])
    found = read_witness_file(path)
    assert found.checkpoints == signed[:1]
    assert found.skipped == [
        "line 2: not a checkpoint record",
        "line 3: not a checkpoint record",
        "line 5: not JSON (truncated or corrupt)",
    ]
    broken = orjson.loads(lines[1])
    broken["signature"] = 17
    path.write_bytes(orjson.dumps(broken) + b"\n")
    assert read_witness_file(path).skipped == ["line 1: malformed checkpoint (TypeError)"]


async def test_writer_exports_checkpoints_to_the_witnesses_and_to_ocsf(
    audit_log: AuditLog, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoints.jsonl"
    ocsf = tmp_path / "audit.ocsf.jsonl"
    writer = AuditWriter(
        audit_log,
        checkpoint_interval=60,
        exporter=OcsfFileExporter(ocsf),
        witnesses=WitnessExporter([FileWitness(path)]),
        checkpoints_to_ocsf=True,
    )
    writer.start()
    try:
        await asyncio.gather(*[writer.record(event(i)) for i in range(10)])
    finally:
        await asyncio.to_thread(writer.stop)  # the final checkpoint reaches the witness before stop ends
    from_file, from_ocsf = read_witness_file(path), read_witness_file(ocsf)
    assert [c.tree_size for c in from_file.checkpoints] == [10]
    assert from_ocsf.checkpoints == from_file.checkpoints and not from_ocsf.skipped  # events passed over
    assert audit_log.verify(witnessed=from_ocsf.checkpoints).ok


class _Endpoint:
    """A witness endpoint that refuses the first `failures` POSTs with 503."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[dict[str, object]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/moved":  # urllib would follow with a GET, whose 2xx is no delivery
                    self.send_response(302)
                    self.send_header("location", "/elsewhere")
                elif endpoint.failures > 0:
                    endpoint.failures -= 1
                    self.send_response(503)
                else:
                    endpoint.received.append(
                        {"auth": self.headers.get("authorization"), **orjson.loads(body)}
                    )
                    self.send_response(204)
                self.end_headers()

            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/checkpoints"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[_Endpoint]:
    server = _Endpoint(failures=2)
    yield server
    server.close()


def _exports(result: str) -> float:
    return (
        REGISTRY.get_sample_value("ztai_audit_witness_exports_total", {"witness": "http", "result": result})
        or 0
    )


def test_http_witness_failures_are_retried_in_order_and_counted(
    audit_log: AuditLog, endpoint: _Endpoint
) -> None:
    signed = _grow(audit_log, 3)
    failed, ok = _exports("failed"), _exports("ok")
    exporter = WitnessExporter(
        [HttpWitness(endpoint.url, timeout=2, token="s3cret")], first_retry_seconds=0.01
    )
    exporter.start()
    started = time.monotonic()
    for checkpoint in signed:
        exporter.submit(checkpoint)  # returns at once, whatever the endpoint does
    assert time.monotonic() - started < 1
    deadline = time.monotonic() + 10
    while len(endpoint.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    exporter.stop()
    assert [r["tree_size"] for r in endpoint.received] == [5, 10, 15]
    assert (
        endpoint.received[0]["auth"] == "Bearer s3cret"
        and endpoint.received[0]["type"] == "ztai.audit.checkpoint"
    )
    assert _exports("failed") - failed == 2 and _exports("ok") - ok == 3


def test_a_full_witness_queue_drops_the_oldest_and_counts_it(audit_log: AuditLog) -> None:
    class Refusing:
        name = "http"

        def send(self, record: bytes) -> None:
            raise OSError("down")

    dropped = _exports("dropped")
    exporter = WitnessExporter([Refusing()], max_pending=2)  # not started: nothing is delivered
    for checkpoint in _grow(audit_log, 3):
        exporter.submit(checkpoint)
    assert _exports("dropped") - dropped == 1


def test_a_redirect_is_not_a_delivery(audit_log: AuditLog, endpoint: _Endpoint) -> None:
    (checkpoint,) = _grow(audit_log, 1)
    witness = HttpWitness(endpoint.url.replace("/checkpoints", "/moved"), timeout=2)
    with pytest.raises(OSError):
        witness.send(witness_record(checkpoint))
