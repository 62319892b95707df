"""The audit log: events as leaves of an append-only Merkle tree, with signed, chained checkpoints.

Appends take a lock (SQLite's write lock; a PostgreSQL advisory lock) so leaf indexes stay dense and
ordered across replicas. A checkpoint signs (tree size, root, time, previous checkpoint hash) with the
audit key; `verify()` recomputes every leaf and every checkpoint from the stored rows.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from ztai.audit import merkle
from ztai.identity.keys import key_id
from ztai.store import AuditCheckpoint, AuditEvent, Database

_ADVISORY_LOCK = 0x7A7461  # "zta"
_NOTE_HEADER = "ztai audit log v1"
_GENESIS = bytes(32)
_VERIFY_BATCH = 5000
_MAX_SEQ = select(func.max(AuditEvent.seq))
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how SQLAlchemy stores DateTime in SQLite


def canonical(event: dict[str, Any]) -> bytes:
    """The exact bytes a leaf commits to: JSON with sorted keys, no whitespace."""
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    root_hash: bytes
    created_at: datetime
    previous_hash: bytes
    key_id: str
    signature: bytes

    @property
    def note(self) -> bytes:
        """The signed statement (a small text, in the spirit of C2SP signed notes)."""
        return (
            f"{_NOTE_HEADER}\n{self.tree_size}\n{_b64(self.root_hash)}\n"
            f"{self.created_at.isoformat()}\n{_b64(self.previous_hash)}\n"
        ).encode()

    @property
    def hash(self) -> bytes:
        """What the next checkpoint chains to."""
        return hashlib.sha256(self.note + self.signature).digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "tree_size": self.tree_size,
            "root_hash": _b64(self.root_hash),
            "created_at": self.created_at.isoformat(),
            "previous_hash": _b64(self.previous_hash),
            "key_id": self.key_id,
            "signature": _b64(self.signature),
        }


def verify_checkpoint(checkpoint: Checkpoint, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(checkpoint.signature, checkpoint.note)
    except InvalidSignature:
        return False
    return True


@dataclass
class VerifyReport:
    ok: bool
    events: int = 0
    checkpoints: int = 0
    uncovered: int = 0  # events after the last checkpoint (not yet signed)
    problem: str = ""
    first_bad_seq: int | None = None
    notes: list[str] = field(default_factory=list)


class AuditLog:
    def __init__(self, database: Database, signing_key: Ed25519PrivateKey) -> None:
        self._database = database
        self._signing_key = signing_key
        self._key_id = key_id(signing_key.public_key())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._signing_key.public_key()

    # Writing ------------------------------------------------------------------------------------
    def append(self, events: list[dict[str, Any]]) -> list[int]:
        """Append events in one transaction; returns their leaf indexes. Durable when this returns.

        This runs once per group commit on the hot path, so it talks to the DB-API driver directly:
        SQLAlchemy's statement machinery cost more than SQLite's own work here.
        """
        if not events:
            return []
        postgres = self._database.is_postgres
        rows = []
        for event in events:
            body = canonical(event)
            created = datetime.fromisoformat(str(event["time"]))
            rows.append(
                [
                    str(event["id"]),
                    str(event.get("tenant", "")),
                    str(event["kind"]),
                    created if postgres else created.strftime(_SQLITE_TIME),
                    body,
                    merkle.hash_leaf(body),
                ]
            )
        connection = self._database.engine.raw_connection()
        try:
            cursor = connection.cursor()
            if postgres:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK,))
            else:
                cursor.execute("BEGIN IMMEDIATE")  # the database write lock: indexes stay dense
            cursor.execute("SELECT MAX(seq) FROM audit_events")
            (highest,) = cursor.fetchone() or (None,)
            first = 0 if highest is None else int(highest) + 1
            marks = ", ".join(["%s" if postgres else "?"] * 7)
            cursor.executemany(
                f"INSERT INTO audit_events (seq, event_id, tenant, kind, created_at, body, leaf_hash) "  # noqa: S608
                f"VALUES ({marks})",
                [(first + offset, *row) for offset, row in enumerate(rows)],
            )
            if postgres:
                connection.commit()
            else:
                cursor.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                if postgres:
                    connection.rollback()
                else:
                    connection.cursor().execute("ROLLBACK")
            raise
        finally:
            connection.close()  # back to the pool
        return [first + offset for offset in range(len(events))]

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current tree head if it grew since the last checkpoint."""
        with self._database.transaction() as session:
            self._lock(session)
            size = self._size(session)
            last = session.execute(
                select(AuditCheckpoint).order_by(AuditCheckpoint.tree_size.desc()).limit(1)
            ).scalar_one_or_none()
            old_size = last.tree_size if last else 0
            if size == old_size:
                return None
            frontier = _split_hashes(last.frontier) if last else []
            if last is not None and merkle.frontier_root(frontier) != last.root_hash:
                raise RuntimeError(
                    "stored frontier does not match the last checkpoint; run `ztai audit verify`"
                )
            new_leaves = session.execute(
                select(AuditEvent.leaf_hash).where(AuditEvent.seq >= old_size).order_by(AuditEvent.seq)
            ).scalars()
            frontier = merkle.extend_frontier(frontier, old_size, list(new_leaves))
            previous = _from_row(last).hash if last else _GENESIS
            unsigned = Checkpoint(
                size, merkle.frontier_root(frontier), datetime.now(UTC), previous, self._key_id, b""
            )
            signed = Checkpoint(**{**unsigned.__dict__, "signature": self._signing_key.sign(unsigned.note)})
            session.add(
                AuditCheckpoint(
                    tree_size=signed.tree_size,
                    root_hash=signed.root_hash,
                    created_at=signed.created_at,
                    previous_hash=signed.previous_hash,
                    key_id=signed.key_id,
                    signature=signed.signature,
                    frontier=b"".join(frontier),
                )
            )
        return signed

    def _lock(self, connection: Session) -> None:
        if self._database.is_postgres:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
        # SQLite: the engine begins every transaction with BEGIN IMMEDIATE (the database write lock).

    @staticmethod
    def _size(session: Session) -> int:
        highest = session.execute(_MAX_SEQ).scalar_one_or_none()
        return 0 if highest is None else int(highest) + 1

    # Reading ------------------------------------------------------------------------------------
    def size(self) -> int:
        with self._database.sessions() as session:
            return self._size(session)

    def checkpoints(self) -> list[Checkpoint]:
        with self._database.sessions() as session:
            rows = session.execute(select(AuditCheckpoint).order_by(AuditCheckpoint.id)).scalars().all()
            return [_from_row(row) for row in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def event(self, seq: int) -> dict[str, Any] | None:
        with self._database.sessions() as session:
            body = session.execute(select(AuditEvent.body).where(AuditEvent.seq == seq)).scalar_one_or_none()
        return orjson.loads(body) if body is not None else None

    def tail(self, count: int) -> list[tuple[int, dict[str, Any]]]:
        with self._database.sessions() as session:
            rows = session.execute(
                select(AuditEvent.seq, AuditEvent.body).order_by(AuditEvent.seq.desc()).limit(count)
            ).all()
        return [(seq, orjson.loads(body)) for seq, body in reversed(rows)]

    def decisions(
        self, *, since: datetime | None = None, limit: int = 10_000, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` decision records (at or after `since`, of `tenant` when given), oldest
        first."""
        query = select(AuditEvent.body).where(AuditEvent.kind == "decision")
        if since is not None:
            query = query.where(AuditEvent.created_at >= since.astimezone(UTC))
        if tenant is not None:
            query = query.where(AuditEvent.tenant == tenant)
        with self._database.sessions() as session:
            bodies = session.execute(query.order_by(AuditEvent.seq.desc()).limit(limit)).scalars().all()
        return [orjson.loads(body) for body in reversed(bodies)]

    def _leaf_hashes(self, size: int) -> list[bytes]:
        """Leaf hashes recomputed from the stored bodies (never trusting the stored hash column)."""
        with self._database.sessions() as session:
            bodies = session.execute(
                select(AuditEvent.body).where(AuditEvent.seq < size).order_by(AuditEvent.seq)
            ).scalars()
            return [merkle.hash_leaf(body) for body in bodies]

    def inclusion_proof(self, seq: int, tree_size: int | None = None) -> dict[str, Any]:
        """Everything needed to check that event `seq` is in a signed tree head, without ztai."""
        checkpoint = self._checkpoint_covering(tree_size or seq + 1, exact=tree_size is not None)
        leaves = self._leaf_hashes(checkpoint.tree_size)
        event = self.event(seq)
        return {
            "index": seq,
            "tree_size": checkpoint.tree_size,
            "leaf_hash": _b64(leaves[seq]),
            "event": event,
            "proof": [_b64(h) for h in merkle.inclusion_proof(seq, leaves)],
            "checkpoint": checkpoint.to_json(),
        }

    def consistency_proof(self, old_size: int, new_size: int) -> dict[str, Any]:
        old = self._checkpoint_covering(old_size, exact=True)
        new = self._checkpoint_covering(new_size, exact=True)
        leaves = self._leaf_hashes(new.tree_size)
        return {
            "old_size": old.tree_size,
            "new_size": new.tree_size,
            "old_root": _b64(old.root_hash),
            "new_root": _b64(new.root_hash),
            "proof": [_b64(h) for h in merkle.consistency_proof(old.tree_size, leaves)],
            "old_checkpoint": old.to_json(),
            "new_checkpoint": new.to_json(),
        }

    def _checkpoint_covering(self, size: int, *, exact: bool) -> Checkpoint:
        for checkpoint in self.checkpoints():
            if checkpoint.tree_size == size or (not exact and checkpoint.tree_size >= size):
                return checkpoint
        wanted = f"of size {size}" if exact else f"covering {size} events"
        raise LookupError(f"no signed checkpoint {wanted} (checkpoints are written every few seconds)")

    # Verification -------------------------------------------------------------------------------
    def verify(self, public_keys: dict[str, Ed25519PublicKey] | None = None) -> VerifyReport:
        """Recompute every leaf and checkpoint root; check signatures and the checkpoint chain."""
        keys = public_keys or {self._key_id: self.public_key}
        checkpoints = self.checkpoints()
        report = VerifyReport(ok=True, checkpoints=len(checkpoints))
        previous_hash = _GENESIS
        previous_size = 0
        for checkpoint in checkpoints:
            key = keys.get(checkpoint.key_id)
            if key is None or not verify_checkpoint(checkpoint, key):
                return _fail(report, f"checkpoint at tree size {checkpoint.tree_size} has a bad signature")
            if checkpoint.previous_hash != previous_hash or checkpoint.tree_size <= previous_size:
                return _fail(
                    report,
                    f"checkpoint at tree size {checkpoint.tree_size} breaks the checkpoint chain"
                    " (a checkpoint was removed, reordered or altered)",
                )
            previous_hash, previous_size = checkpoint.hash, checkpoint.tree_size
        pending = {c.tree_size: c for c in checkpoints}
        frontier: list[bytes] = []
        expected_seq = 0
        for seq, body, stored_hash in self._rows():
            if seq != expected_seq:
                return _fail(report, f"event {expected_seq} is missing", expected_seq)
            leaf = merkle.hash_leaf(body)
            if leaf != stored_hash:
                return _fail(
                    report, f"event {seq} was altered (its content no longer matches its leaf hash)", seq
                )
            frontier = merkle.extend_frontier(frontier, seq, [leaf])
            expected_seq += 1
            signed_head = pending.pop(expected_seq) if expected_seq in pending else None
            if signed_head is not None and merkle.frontier_root(frontier) != signed_head.root_hash:
                return _fail(
                    report,
                    f"the tree of size {expected_seq} does not match its signed checkpoint:"
                    f" an event at or before {seq} was altered, inserted or removed",
                    seq,
                )
        report.events = expected_seq
        if pending:
            smallest = min(pending)
            return _fail(
                report,
                f"checkpoint at tree size {smallest} covers events that are missing "
                f"(the log has only {expected_seq})",
                expected_seq,
            )
        report.uncovered = expected_seq - previous_size
        if report.uncovered:
            report.notes.append(
                f"{report.uncovered} newest events are not yet covered by a signed checkpoint"
            )
        return report

    def _rows(self) -> Iterator[tuple[int, bytes, bytes]]:
        start = 0
        while True:
            with self._database.sessions() as session:
                rows = session.execute(
                    select(AuditEvent.seq, AuditEvent.body, AuditEvent.leaf_hash)
                    .where(AuditEvent.seq >= start)
                    .order_by(AuditEvent.seq)
                    .limit(_VERIFY_BATCH)
                ).all()
            if not rows:
                return
            for seq, body, leaf_hash in rows:
                # A tampered row may even change a column's type; compare as bytes.
                yield int(seq), _as_bytes(body), _as_bytes(leaf_hash)
            start = int(rows[-1][0]) + 1


def _fail(report: VerifyReport, problem: str, seq: int | None = None) -> VerifyReport:
    report.ok = False
    report.problem = problem
    report.first_bad_seq = seq
    return report


def _from_row(row: AuditCheckpoint) -> Checkpoint:
    created = (row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)).astimezone(
        UTC
    )
    return Checkpoint(
        row.tree_size,
        bytes(row.root_hash),
        created,
        bytes(row.previous_hash),
        row.key_id,
        bytes(row.signature),
    )


def _split_hashes(blob: bytes) -> list[bytes]:
    return [bytes(blob[i : i + merkle.HASH_SIZE]) for i in range(0, len(blob), merkle.HASH_SIZE)]


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
