"""Policy reloads across workers and replicas: a request in the store, applied by each of them.

`ztai policy reload` (or SIGHUP to the server) validates the policy directory and records its revision
as a reload request (`policy_reloads`). Every worker polls the newest request (and, with Redis, is
woken by a notice on `POLICY_CHANNEL`), loads and validates the directory itself, and swaps its active
bundle to it only when the loaded revision is the requested one: a set that fails validation, or a
directory that changed since it was validated, is refused and the worker keeps what it has. Each
worker records the outcome as an audit event (`policy.reloaded` / `policy.reload_refused`) naming the
request, which is also how the CLI learns that the workers applied it.

A notice carries no policy and no revision, only "look now": a forged one costs a read of the store.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from ztai.audit.events import new_event_id, now_iso
from ztai.errors import StoreError
from ztai.store import AuditEvent, Database, PolicyReload

POLICY_CHANNEL = "ztai:policy"  # Redis pub/sub: "a reload was requested, read the store now"
APPLIED = "policy.reloaded"
REFUSED = "policy.reload_refused"


@dataclass(frozen=True, slots=True)
class ReloadRequest:
    id: int
    revision: str


class PolicyReloads:
    """The reload requests in the store."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def request(self, revision: str, requested_by: str) -> ReloadRequest:
        """Record a request to swap to `revision` (already validated by the caller)."""
        row = PolicyReload(revision=revision, requested_at=datetime.now(UTC), requested_by=requested_by[:255])
        try:
            with self._database.transaction() as session:
                session.add(row)
                session.flush()
                return ReloadRequest(row.id, revision)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot record the policy reload: {type(exc).__name__}") from exc

    def latest(self) -> ReloadRequest | None:
        """The newest request, or None when there never was one."""
        query = select(PolicyReload.id, PolicyReload.revision).order_by(PolicyReload.id.desc()).limit(1)
        try:
            with self._database.sessions() as session:
                row = session.execute(query).first()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read policy reloads: {type(exc).__name__}") from exc
        return ReloadRequest(int(row[0]), str(row[1])) if row is not None else None

    def outcomes(self, request_id: int, after_seq: int) -> list[dict[str, Any]]:
        """The workers' audit events about request `request_id` (appended after leaf `after_seq`)."""
        query = select(AuditEvent.body).where(
            AuditEvent.seq >= after_seq, AuditEvent.kind.in_((APPLIED, REFUSED))
        )
        try:
            with self._database.sessions() as session:
                bodies = session.execute(query).scalars().all()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the audit log: {type(exc).__name__}") from exc
        events = [orjson.loads(body) for body in bodies]
        return [event for event in events if event.get("reload", {}).get("id") == request_id]

    def next_audit_seq(self) -> int:
        """The leaf index the next audit event will get (leaves are dense: one past the newest)."""
        newest = select(func.coalesce(func.max(AuditEvent.seq), -1))
        try:
            with self._database.sessions() as session:
                return int(session.execute(newest).scalar_one()) + 1
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the audit log: {type(exc).__name__}") from exc


def reload_event(
    kind: str,
    *,
    tenant: str,
    principal: str,
    request: ReloadRequest | None,
    revision: str,
    previous: str,
    problem: str = "",
) -> dict[str, Any]:
    """The audit event of one worker's (or the CLI's) outcome of a reload request."""
    refused = kind == REFUSED
    return {
        "id": new_event_id(),
        "kind": kind,
        "time": now_iso(),
        "tenant": tenant,
        "principal": principal,
        "action": "policy.reload",
        "resource": f"PolicySet::{revision or 'invalid'}",
        "effect": "deny" if refused else "allow",
        "reasons": [problem[:2000]] if refused else [],
        "policy_revision": previous,
        "reload": {
            "id": request.id if request is not None else None,
            "revision": revision,
            "previous": previous,
            "worker": worker_name(),
        },
    }


def worker_name() -> str:
    """host:pid of this process, as reload outcomes name the worker."""
    return f"{socket.gethostname()}:{os.getpid()}"


__all__ = [
    "APPLIED",
    "POLICY_CHANNEL",
    "REFUSED",
    "PolicyReloads",
    "ReloadRequest",
    "reload_event",
    "worker_name",
]
