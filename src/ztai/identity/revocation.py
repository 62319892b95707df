"""Revoked token ids and revoked tasks: durable in the store, checked per request from memory kept current.

Two kinds of revocation: a token (`jti`) and an agent task (every token whose `task_chain` holds the task,
so revoking a task also revokes its sub-tasks). Every replica polls the store for revocations made since
its last look (with an overlap, so a row committed late by another replica is not missed). If the store
cannot be read for too long the list is stale and verification fails closed.

When Redis is configured, each new revocation is also published as a small notice (`publish`), and
replicas apply the notices they receive (`apply_notice`) at once instead of at their next poll. A notice
can only add a revocation, never lift one, so a forged notice can refuse tokens but never admit one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from ztai.errors import MalformedRequest, NotFound, StoreError
from ztai.identity.task_tokens import TASK_ID
from ztai.store import Database, IssuedTaskRecord, RevokedTask, RevokedToken, aware
from ztai.store.shared import PubSubChannel

REVOCATION_CHANNEL = "ztai:revocations"  # the Redis pub/sub channel of revocation notices
_JTI = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_MAX_TENANT = 255
_MAX_NOTICE_LIFETIME = 86_400.0  # a notice cannot make the list remember anything for longer than a day
_OVERLAP = timedelta(seconds=30)
_TASK_RECORD_GRACE = 300.0  # an issued task stays revocable this long past its expiry (verification leeway)

NoticeKind = Literal["token", "task"]


@dataclass(frozen=True, slots=True)
class RevocationNotice:
    """One revocation as replicas tell each other about it: tenant, what (token jti or task id), until."""

    tenant: str
    kind: NoticeKind
    id: str
    expires_at: float

    def encode(self) -> bytes:
        return orjson.dumps(
            {"v": 1, "tenant": self.tenant, "kind": self.kind, "id": self.id, "exp": int(self.expires_at)}
        )

    @classmethod
    def decode(cls, data: bytes) -> RevocationNotice:
        """Parse and validate a notice; raises MalformedRequest for anything unexpected."""
        try:
            body: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise MalformedRequest("revocation notice is not JSON") from None
        if not isinstance(body, dict) or body.get("v") != 1:
            raise MalformedRequest("revocation notice has an unknown shape")
        tenant, kind, ident, expires = body.get("tenant"), body.get("kind"), body.get("id"), body.get("exp")
        if not isinstance(tenant, str) or not 0 < len(tenant) <= _MAX_TENANT:
            raise MalformedRequest("revocation notice has a bad tenant")
        if isinstance(expires, bool) or not isinstance(expires, int):
            raise MalformedRequest("revocation notice has a bad expiry")
        if kind == "task" and isinstance(ident, str) and TASK_ID.match(ident):
            return cls(tenant, "task", ident, float(expires))
        if kind == "token" and isinstance(ident, str) and _JTI.match(ident):
            return cls(tenant, "token", ident, float(expires))
        raise MalformedRequest("revocation notice names no valid token or task")


class RevocationList:
    def __init__(
        self,
        database: Database,
        *,
        refresh_seconds: float = 1.0,
        publish: Callable[[bytes], None] | None = None,
    ) -> None:
        self._database = database
        self._refresh_seconds = refresh_seconds
        self._revoked: dict[tuple[str, str], float] = {}  # (tenant, jti) -> expiry (epoch seconds)
        self._revoked_tasks: dict[tuple[str, str], float] = {}  # (tenant, task id) -> expiry
        self._watermark: datetime | None = None
        self._fresh_at = 0.0
        # Called with each new revocation's encoded notice once it is durable (e.g. a Redis publish).
        self.publish = publish

    # Questions (hot path, memory only) ----------------------------------------------------------------
    def is_revoked(self, tenant: str, jti: str) -> bool:
        self._check_fresh()
        return (tenant, jti) in self._revoked

    def is_task_revoked(self, tenant: str, chain: Iterable[str]) -> bool:
        """Whether any task of `chain` (root first, as in a token's `task_chain`) is revoked."""
        self._check_fresh()
        if not self._revoked_tasks:
            return False
        return any((tenant, task) in self._revoked_tasks for task in chain)

    def _check_fresh(self) -> None:
        if time.monotonic() - self._fresh_at > max(5 * self._refresh_seconds, 5.0):
            raise StoreError("revocation list is stale (store unreachable): refusing to accept tokens")

    # Revoking ---------------------------------------------------------------------------------------
    def revoke(self, tenant: str, jti: str, expires_at: float, reason: str = "") -> RevocationNotice:
        """Record a token revocation durably (idempotent), apply it locally at once, and publish it."""
        self._insert(RevokedToken, {"tenant": tenant, "jti": jti}, expires_at, reason)
        self._revoked[(tenant, jti)] = expires_at
        return self._announce(RevocationNotice(tenant, "token", jti, expires_at))

    def revoke_task(self, tenant: str, task_id: str, expires_at: float, reason: str = "") -> RevocationNotice:
        """Revoke a task and, through their task chains, all its sub-tasks (durable, idempotent). Records
        any id: admin paths use `revoke_tenant_task`, which first checks ztai issued it in the tenant."""
        if not TASK_ID.match(task_id):
            raise MalformedRequest("a task id looks like tsk_<hex>")
        self._insert(RevokedTask, {"tenant": tenant, "task_id": task_id}, expires_at, reason)
        self._revoked_tasks[(tenant, task_id)] = expires_at
        return self._announce(RevocationNotice(tenant, "task", task_id, expires_at))

    def revoke_tenant_task(
        self, tenant: str, task_id: str, expires_at: float, reason: str = ""
    ) -> RevocationNotice:
        """`revoke_task` for an admin of `tenant`: NotFound unless ztai issued `task_id` in `tenant` and
        its tokens may still be live (another tenant's task reads as absent, and nothing is recorded)."""
        if not TASK_ID.match(task_id):
            raise MalformedRequest("a task id looks like tsk_<hex>")
        if not self.task_issued(tenant, task_id):
            raise NotFound(f"no task {task_id} in tenant {tenant}")
        return self.revoke_task(tenant, task_id, expires_at, reason)

    # Issued tasks -------------------------------------------------------------------------------------
    def record_task(self, tenant: str, task_id: str, expires_at: float) -> None:
        """Remember that ztai issued `task_id` in `tenant` (at exchange, before its token is handed out),
        until its token expires; records past that are pruned here."""
        now = datetime.now(UTC)
        values = {
            "tenant": tenant,
            "task_id": task_id,
            "created_at": now,
            "expires_at": datetime.fromtimestamp(expires_at + _TASK_RECORD_GRACE, UTC),
        }
        insert = pg_insert if self._database.is_postgres else sqlite_insert
        try:
            with self._database.transaction() as session:
                session.execute(insert(IssuedTaskRecord).values(**values).on_conflict_do_nothing())
                session.execute(delete(IssuedTaskRecord).where(IssuedTaskRecord.expires_at < now))
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot record the task: {type(exc).__name__}") from exc

    def task_issued(self, tenant: str, task_id: str) -> bool:
        """Whether ztai issued `task_id` in `tenant` and its tokens may still be live."""
        query = select(IssuedTaskRecord.task_id).where(
            IssuedTaskRecord.tenant == tenant,
            IssuedTaskRecord.task_id == task_id,
            IssuedTaskRecord.expires_at >= datetime.now(UTC),
        )
        try:
            with self._database.sessions() as session:
                return session.execute(query).first() is not None
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the tasks: {type(exc).__name__}") from exc

    def _insert(
        self, table: type[RevokedToken | RevokedTask], key: dict[str, str], expires: float, reason: str
    ) -> None:
        values = {
            **key,
            "revoked_at": datetime.now(UTC),
            "expires_at": datetime.fromtimestamp(expires, UTC),
            "reason": reason[:500],
        }
        insert = pg_insert if self._database.is_postgres else sqlite_insert
        statement = insert(table).values(**values).on_conflict_do_nothing()
        try:
            with self._database.transaction() as session:
                session.execute(statement)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot record the revocation: {type(exc).__name__}") from exc

    def _announce(self, notice: RevocationNotice) -> RevocationNotice:
        if self.publish is not None:
            self.publish(notice.encode())
        return notice

    def apply_notice(self, data: bytes) -> RevocationNotice:
        """Apply a notice from another replica (memory only: the durable row is the sender's job)."""
        notice = RevocationNotice.decode(data)
        expires = min(notice.expires_at, time.time() + _MAX_NOTICE_LIFETIME)
        target = self._revoked_tasks if notice.kind == "task" else self._revoked
        target[(notice.tenant, notice.id)] = max(expires, target.get((notice.tenant, notice.id), 0.0))
        return notice

    # Polling ----------------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Load revocations newer than the last refresh; prune expired ones. Returns how many are known."""
        now = datetime.now(UTC)
        tokens = select(RevokedToken.tenant, RevokedToken.jti, RevokedToken.expires_at).where(
            RevokedToken.expires_at > now
        )
        tasks = select(RevokedTask.tenant, RevokedTask.task_id, RevokedTask.expires_at).where(
            RevokedTask.expires_at > now
        )
        if self._watermark is not None:
            tokens = tokens.where(RevokedToken.revoked_at >= self._watermark - _OVERLAP)
            tasks = tasks.where(RevokedTask.revoked_at >= self._watermark - _OVERLAP)
        try:
            with self._database.sessions() as session:
                token_rows = session.execute(tokens).all()
                task_rows = session.execute(tasks).all()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read revocations: {type(exc).__name__}") from exc
        for tenant, jti, expires_at in token_rows:
            self._revoked[(tenant, jti)] = aware(expires_at).timestamp()
        for tenant, task_id, expires_at in task_rows:
            self._revoked_tasks[(tenant, task_id)] = aware(expires_at).timestamp()
        cutoff = time.time() - 300  # keep past the verification leeway
        for known in (self._revoked, self._revoked_tasks):
            for key in [k for k, expiry in known.items() if expiry < cutoff]:
                del known[key]
        self._watermark = now
        self._fresh_at = time.monotonic()
        return len(self._revoked) + len(self._revoked_tasks)


class RevocationFeed:
    """Replicas telling each other about revocations over Redis pub/sub (`store.redis_url`).

    `start()` (on the event loop) makes the list publish each new revocation and apply the notices of
    every replica as they arrive; the listener reconnects by itself. Polling goes on regardless, so a
    Redis outage delays revocations to the poll interval and never loses them.
    """

    def __init__(self, revocations: RevocationList, redis_url: str) -> None:
        self._revocations = revocations
        self.channel = PubSubChannel(redis_url, REVOCATION_CHANNEL)
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.channel.start()
        self._revocations.publish = self.channel.publish_threadsafe
        self._listener = asyncio.create_task(self.channel.listen(self._apply))

    def _apply(self, data: bytes) -> None:
        self._revocations.apply_notice(data)

    async def close(self) -> None:
        self._revocations.publish = None
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.channel.close()
