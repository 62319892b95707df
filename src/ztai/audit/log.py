"""The audit log: events as leaves of an append-only Merkle tree, with signed, chained checkpoints.

Appends take a lock (SQLite's write lock; a PostgreSQL advisory lock) so leaf indexes stay dense and
ordered across replicas. A checkpoint signs (tree size, root, time, previous checkpoint hash) with the
audit key; `verify()` recomputes every leaf and every checkpoint from the stored rows, checks that every
stored column of an event agrees with its hashed body, and, given checkpoints a witness kept, that the
store still holds everything they signed. `coverage()` says how long the newest events have waited for a
checkpoint: what readiness and the writer's metrics are derived from, whichever process wrote them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import String, func, select, text, type_coerce, update
from sqlalchemy.orm import Session

from ztai.audit import merkle
from ztai.errors import CheckpointError
from ztai.identity.keys import key_id
from ztai.store import AuditCheckpoint, AuditEvent, Database, aware

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

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Checkpoint:
        """The inverse of `to_json`; raises ValueError (or KeyError, TypeError) on a malformed one."""
        created = datetime.fromisoformat(str(document["created_at"]))
        if created.tzinfo is None:
            raise ValueError("created_at has no time zone")
        return cls(
            int(document["tree_size"]),
            base64.b64decode(document["root_hash"], validate=True),
            created.astimezone(UTC),
            base64.b64decode(document["previous_hash"], validate=True),
            str(document["key_id"]),
            base64.b64decode(document["signature"], validate=True),
        )


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
    uncovered_since: datetime | None = None  # the time of the oldest of them
    witnessed: int = 0  # checkpoints of a witness checked against the store
    problem: str = ""
    first_bad_seq: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Coverage:
    """How far the signed checkpoints reach, read from the store (the same for every process)."""

    size: int  # events stored (the highest leaf index + 1)
    covered: int  # the newest checkpoint's tree size
    checkpoint_at: datetime | None  # when the newest checkpoint was signed
    oldest_uncovered_at: datetime | None  # the time of the first event no checkpoint covers

    @property
    def uncovered(self) -> int:
        return max(0, self.size - self.covered)

    def uncovered_seconds(self, now: datetime | None = None) -> float:
        if self.oldest_uncovered_at is None:
            return 0.0
        return max(0.0, ((now or datetime.now(UTC)) - self.oldest_uncovered_at).total_seconds())

    def problem(self, max_uncovered_seconds: float, now: datetime | None = None) -> str | None:
        """Why the log cannot be trusted to stay complete, or None."""
        if self.size < self.covered:
            return (
                f"the newest checkpoint covers {self.covered} events but the log has {self.size}"
                " (events were deleted)"
            )
        waited = self.uncovered_seconds(now)
        if waited > max_uncovered_seconds:
            return (
                f"{self.uncovered} events not covered by a signed checkpoint for {waited:.0f}s"
                f" (bound {max_uncovered_seconds:g}s): checkpoints are not being written"
            )
        return None


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
            event_id, tenant, kind, created = _columns(event)
            rows.append(
                [
                    event_id,
                    tenant,
                    kind,
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
            # One subtree per set bit of the size: a frontier of another shape (say, just the root)
            # could match the root and still extend into a wrong tree, signed.
            shape_ok = len(frontier) == old_size.bit_count()
            if last is not None and (not shape_ok or merkle.frontier_root(frontier) != last.root_hash):
                raise CheckpointError(
                    "frontier_mismatch",
                    f"the stored frontier of the checkpoint at tree size {old_size} does not match its"
                    " signed root; run `ztai audit verify`",
                )
            if size < old_size:
                raise CheckpointError(
                    "events_missing",
                    f"the newest checkpoint covers {old_size} events but the log has {size};"
                    " run `ztai audit verify`",
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

    def coverage(self) -> Coverage:
        """The newest checkpoint against the newest events (three indexed reads)."""
        with self._database.guarded("read the audit log", write=False) as session:
            size = self._size(session)
            newest = session.execute(
                select(AuditCheckpoint.tree_size, AuditCheckpoint.created_at)
                .order_by(AuditCheckpoint.tree_size.desc())
                .limit(1)
            ).one_or_none()
            covered, signed_at = (int(newest[0]), aware(newest[1])) if newest else (0, None)
            oldest = session.execute(
                select(AuditEvent.created_at)
                .where(AuditEvent.seq >= covered)
                .order_by(AuditEvent.seq)
                .limit(1)
            ).scalar_one_or_none()
        return Coverage(size, covered, signed_at, aware(oldest) if oldest is not None else None)

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
    def verify(
        self,
        public_keys: dict[str, Ed25519PublicKey] | None = None,
        witnessed: list[Checkpoint] | None = None,
    ) -> VerifyReport:
        """Recompute every leaf and checkpoint root; check signatures, the checkpoint chain, that every
        stored column of an event agrees with its hashed body, and, given `witnessed` (checkpoints a
        witness kept), that the store still holds every event and checkpoint the witness saw."""
        keys = public_keys or {self._key_id: self.public_key}
        checkpoints = self.checkpoints()
        seen = witnessed or []
        report = VerifyReport(ok=True, checkpoints=len(checkpoints))
        problem = _check_chain(checkpoints, keys) or _check_witnessed(checkpoints, seen, keys)
        if problem:
            return _fail(report, problem)
        covered = checkpoints[-1].tree_size if checkpoints else 0
        frontiers = self._frontiers()
        heads: dict[int, list[tuple[str, Checkpoint, bytes | None]]] = {}
        for checkpoint in checkpoints:
            heads.setdefault(checkpoint.tree_size, []).append(
                ("its signed", checkpoint, frontiers.get(checkpoint.tree_size))
            )
        for checkpoint in {c.tree_size: c for c in seen}.values():
            heads.setdefault(checkpoint.tree_size, []).append(("the witnessed", checkpoint, None))
        failure = self._check_leaves(report, heads, covered)
        if failure is not None:
            return _fail(report, *failure)
        problem = _missing_events(report.events, checkpoints, seen)
        if problem:
            return _fail(report, problem, report.events)
        report.uncovered = report.events - covered
        if report.uncovered:
            report.notes.append(
                f"{report.uncovered} newest events are not yet covered by a signed checkpoint"
            )
        _witness_notes(report, checkpoints, seen)
        return report

    def _check_leaves(
        self, report: VerifyReport, heads: dict[int, list[tuple[str, Checkpoint, bytes | None]]], covered: int
    ) -> tuple[str, int] | None:
        """One pass over the events: dense indexes, leaf hashes, columns, and every root in `heads`."""
        frontier: list[bytes] = []
        expected_seq = 0
        for row in self._rows():
            seq = row.seq
            if seq != expected_seq:
                return f"event {expected_seq} is missing", expected_seq
            leaf = merkle.hash_leaf(row.body)
            if leaf != row.leaf_hash:
                return f"event {seq} was altered (its content no longer matches its leaf hash)", seq
            column = _disagreeing_column(row)
            if column is not None:
                return (
                    f"event {seq} was altered (its stored {column} no longer matches the hashed event)",
                    seq,
                )
            if seq == covered:
                report.uncovered_since = _columns(orjson.loads(row.body))[3]
            frontier = merkle.extend_frontier(frontier, seq, [leaf])
            expected_seq += 1
            for what, head, stored_frontier in heads.pop(expected_seq, []):
                if merkle.frontier_root(frontier) != head.root_hash:
                    return (
                        f"the tree of size {expected_seq} does not match {what} checkpoint:"
                        f" an event at or before {seq} was altered, inserted or removed",
                        seq,
                    )
                if stored_frontier is not None and stored_frontier != b"".join(frontier):
                    return (
                        f"the stored frontier of the checkpoint at tree size {expected_seq} was altered"
                        " (no later checkpoint can be written)",
                        seq,
                    )
        report.events = expected_seq
        return None

    def repair_frontiers(self, public_keys: dict[str, Ed25519PublicKey] | None = None) -> list[int]:
        """Rewrite stored frontiers that disagree with the tree (they are derived data, and a wrong one
        stops every later checkpoint). Only where the events reproduce the checkpoint's signed root:
        anything else is not a frontier problem and raises CheckpointError. Returns the sizes repaired."""
        checkpoints = self.checkpoints()
        problem = _check_chain(checkpoints, public_keys or {self._key_id: self.public_key})
        if problem:
            raise CheckpointError("chain", problem)
        stored = self._frontiers()
        wrong = {
            size: blob
            for size, blob in self._true_frontiers({c.tree_size: c.root_hash for c in checkpoints}).items()
            if stored.get(size) != blob
        }
        with self._database.transaction() as session:
            self._lock(session)
            for size, blob in wrong.items():
                session.execute(
                    update(AuditCheckpoint).where(AuditCheckpoint.tree_size == size).values(frontier=blob)
                )
        return sorted(wrong)

    def _true_frontiers(self, roots: dict[int, bytes]) -> dict[int, bytes]:
        """The frontier at each signed size, recomputed from the stored bodies and checked against the
        signed root."""
        pending = dict(roots)
        found: dict[int, bytes] = {}
        frontier: list[bytes] = []
        for seq, row in enumerate(self._rows()):
            if row.seq != seq or not pending:
                break
            frontier = merkle.extend_frontier(frontier, seq, [merkle.hash_leaf(row.body)])
            root = pending.pop(seq + 1, None)
            if root is not None:
                if merkle.frontier_root(frontier) != root:
                    raise CheckpointError(
                        "root_mismatch", f"the events do not reproduce the checkpoint at tree size {seq + 1}"
                    )
                found[seq + 1] = b"".join(frontier)
        if pending:
            raise CheckpointError(
                "events_missing", f"the checkpoint at tree size {min(pending)} covers missing events"
            )
        return found

    def _frontiers(self) -> dict[int, bytes]:
        with self._database.sessions() as session:
            rows = session.execute(select(AuditCheckpoint.tree_size, AuditCheckpoint.frontier)).all()
        return {int(size): _as_bytes(frontier) for size, frontier in rows}

    def _rows(self) -> Iterator[_Row]:
        start = 0
        # Read as stored: a tampered row may even change a column's type.
        created = type_coerce(AuditEvent.created_at, String)
        while True:
            with self._database.sessions() as session:
                rows = session.execute(
                    select(
                        AuditEvent.seq,
                        AuditEvent.event_id,
                        AuditEvent.tenant,
                        AuditEvent.kind,
                        created,
                        AuditEvent.body,
                        AuditEvent.leaf_hash,
                    )
                    .where(AuditEvent.seq >= start)
                    .order_by(AuditEvent.seq)
                    .limit(_VERIFY_BATCH)
                ).all()
            if not rows:
                return
            for seq, event_id, tenant, kind, created_at, body, leaf_hash in rows:
                yield _Row(
                    int(seq), event_id, tenant, kind, created_at, _as_bytes(body), _as_bytes(leaf_hash)
                )
            start = int(rows[-1][0]) + 1


class _Row(NamedTuple):
    seq: int
    event_id: Any
    tenant: Any
    kind: Any
    created_at: Any
    body: bytes
    leaf_hash: bytes


def _columns(event: dict[str, Any]) -> tuple[str, str, str, datetime]:
    """The stored columns derived from an event: id, tenant, kind and its time in UTC."""
    created = datetime.fromisoformat(str(event["time"]))
    created = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
    return str(event["id"]), str(event.get("tenant", "")), str(event["kind"]), created.astimezone(UTC)


def _disagreeing_column(row: _Row) -> str | None:
    """The first stored column that is not what the hashed body says it must be, or None."""
    try:
        event = orjson.loads(row.body)
        expected = _columns(event)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return "body (not an event)"
    stored = (row.event_id, row.tenant, row.kind, _stored_time(row.created_at))
    for name, want, have in zip(("event_id", "tenant", "kind", "created_at"), expected, stored, strict=True):
        if want != have:
            return name
    return None


def _stored_time(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    return aware(value).astimezone(UTC) if isinstance(value, datetime) else None


def _check_chain(checkpoints: list[Checkpoint], keys: dict[str, Ed25519PublicKey]) -> str | None:
    previous_hash = _GENESIS
    previous_size = 0
    for checkpoint in checkpoints:
        key = keys.get(checkpoint.key_id)
        if key is None or not verify_checkpoint(checkpoint, key):
            return f"checkpoint at tree size {checkpoint.tree_size} has a bad signature"
        if checkpoint.previous_hash != previous_hash or checkpoint.tree_size <= previous_size:
            return (
                f"checkpoint at tree size {checkpoint.tree_size} breaks the checkpoint chain"
                " (a checkpoint was removed, reordered or altered)"
            )
        previous_hash, previous_size = checkpoint.hash, checkpoint.tree_size
    return None


def _check_witnessed(
    stored: list[Checkpoint], witnessed: list[Checkpoint], keys: dict[str, Ed25519PublicKey]
) -> str | None:
    """A witnessed checkpoint must be genuine, unique for its size, and the same as the stored one."""
    by_size: dict[int, Checkpoint] = {}
    for checkpoint in witnessed:
        key = keys.get(checkpoint.key_id)
        if key is None or not verify_checkpoint(checkpoint, key):
            return (
                f"the witnessed checkpoint at tree size {checkpoint.tree_size} has a bad signature"
                " (not signed by this log's key)"
            )
        if by_size.setdefault(checkpoint.tree_size, checkpoint).hash != checkpoint.hash:
            return f"the witness holds two different signed checkpoints of tree size {checkpoint.tree_size}"
    mine = {c.tree_size: c for c in stored}
    for size in sorted(by_size):
        if size in mine and mine[size].hash != by_size[size].hash:
            return (
                f"the stored checkpoint at tree size {size} differs from the witnessed one (it was replaced)"
            )
    return None


def _missing_events(events: int, stored: list[Checkpoint], witnessed: list[Checkpoint]) -> str | None:
    """What checkpoints (stored, then witnessed) say exists that the store no longer holds."""
    beyond = sorted(c.tree_size for c in stored if c.tree_size > events)
    if beyond:
        return (
            f"checkpoint at tree size {beyond[0]} covers events that are missing (the log has only {events})"
        )
    newest = max(witnessed, key=lambda c: c.tree_size, default=None)
    if newest is not None and newest.tree_size > events:
        return (
            f"the witness holds a checkpoint of tree size {newest.tree_size} signed"
            f" {newest.created_at.isoformat()}, but the log has only {events} events:"
            " the newest events and the checkpoints covering them were deleted"
        )
    sizes = {c.tree_size for c in stored}
    absent = sorted({c.tree_size for c in witnessed} - sizes)
    if absent:
        return (
            f"{len(absent)} witnessed checkpoints are missing from the store (the newest at tree size"
            f" {absent[-1]}): checkpoints were deleted"
        )
    return None


def _witness_notes(report: VerifyReport, stored: list[Checkpoint], witnessed: list[Checkpoint]) -> None:
    if not witnessed:
        return
    sizes = {c.tree_size for c in witnessed}
    report.witnessed = len(sizes)
    report.notes.append(
        f"witness: {len(sizes)} checkpoints match the log (the newest at tree size {max(sizes)})"
    )
    unwitnessed = sum(1 for c in stored if c.tree_size > max(sizes))
    if unwitnessed:
        report.notes.append(f"{unwitnessed} newest stored checkpoints are not in the witness yet")


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
