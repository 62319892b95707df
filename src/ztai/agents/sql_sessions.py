"""Agent sessions in the SQL store (SQLite or PostgreSQL): what several workers or replicas share when no
Redis is configured (`store.redis_url` unset).

The same `SessionStore` as the in-process and Redis stores, in three tables (`ztai.store.tables`):
`agent_sessions` (the state policy sees), `agent_session_values` (value key -> FLAG bits) and
`agent_call_counts` (budgets). A write is one transaction that first locks the session's row (SQLite's
BEGIN IMMEDIATE serialises writers; PostgreSQL: SELECT ... FOR UPDATE), so the bound on value keys per
session is exact and an expired session starts over empty; the flag bits are OR-ed by the database
itself (INSERT ... ON CONFLICT DO UPDATE SET flags = flags | new) and call counters incremented the same
way, so no update is lost between workers. Sessions and counters expire `ttl_seconds` after their last
write; `purge` deletes expired rows (the gateway runs it periodically). Blocking: called on a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import case, delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ztai.agents.provenance import Observed
from ztai.agents.session import (
    FLAG_SUSPICIOUS,
    FLAG_TRUSTED,
    FLAG_UNTRUSTED,
    ChainLimits,
    SessionState,
)
from ztai.store import AgentCallCount, AgentSession, AgentSessionValue, Database, aware

CHUNK = 500  # keys per statement (bounded parameter lists)
MAX_SOURCES = 64  # untrusted sources remembered per session
PURGE_BATCH = 500  # expired sessions deleted per statement


class SqlSessionStore:
    """Sessions in the SQL store, shared by every worker and replica using it."""

    purge_interval_seconds = 60.0

    def __init__(
        self,
        database: Database,
        *,
        ttl_seconds: int = 7200,
        max_values: int = 50_000,
        count_ttl_seconds: int | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._database = database
        self._ttl = timedelta(seconds=ttl_seconds)
        # Budget counters outlive every token of their task (agents.max_task_ttl_seconds).
        self._count_ttl = max(self._ttl, timedelta(seconds=count_ttl_seconds or 0))
        self._max_values = max_values
        self._clock = clock or (lambda: datetime.now(UTC))
        self._insert: Any = postgresql.insert if database.is_postgres else sqlite.insert

    # SessionStore -----------------------------------------------------------------------------------
    async def record(
        self, tenant: str, session: str, observed: Observed, *, trusted: bool, source: str, flagged: bool
    ) -> SessionState:
        bit = FLAG_TRUSTED if trusted else FLAG_UNTRUSTED
        bits: dict[bytes, int] = dict.fromkeys(observed.values, bit)
        for key in observed.suspicious:
            bits[key] = bits.get(key, 0) | FLAG_SUSPICIOUS | FLAG_UNTRUSTED
        score = round(observed.max_probability * 100)
        return await asyncio.to_thread(
            self._record, tenant, session, bits, None if trusted else (source[:200], flagged, score)
        )

    async def lookup(
        self, tenant: str, session: str, keys: set[bytes]
    ) -> tuple[SessionState, dict[bytes, int]]:
        return await asyncio.to_thread(self._lookup, tenant, session, keys)

    async def spend_call(self, tenant: str, chain: ChainLimits) -> str | None:
        if not chain:
            return None
        return await asyncio.to_thread(self._spend_call, tenant, tuple(chain))

    async def close(self) -> None:
        return None  # the database is the runtime's, closed with it

    def purge(self) -> int:
        """Delete expired sessions (with their value keys) and call counters; returns sessions removed."""
        now = self._clock()
        with self._database.guarded("purge expired agent sessions") as db:
            expired = db.execute(
                select(AgentSession.tenant, AgentSession.session)
                .where(AgentSession.expires_at <= now)
                .limit(PURGE_BATCH)
            ).all()
            if expired:
                pairs = [(row.tenant, row.session) for row in expired]
                columns = tuple_(AgentSessionValue.tenant, AgentSessionValue.session)
                db.execute(delete(AgentSessionValue).where(columns.in_(pairs)))
                owners = tuple_(AgentSession.tenant, AgentSession.session)
                db.execute(delete(AgentSession).where(owners.in_(pairs), AgentSession.expires_at <= now))
            db.execute(delete(AgentCallCount).where(AgentCallCount.expires_at <= now))
        return len(expired)

    # Transactions -----------------------------------------------------------------------------------
    def _record(
        self, tenant: str, session: str, bits: dict[bytes, int], untrusted: tuple[str, bool, int] | None
    ) -> SessionState:
        now = self._clock()
        with self._database.guarded("record the agent session") as db:
            row = self._locked(db, tenant, session, now)
            known = self._existing(db, tenant, session, bits)
            room = max(0, self._max_values - row.value_count)
            fresh = [key for key in bits if key not in known][:room]
            self._or_flags(db, tenant, session, [(key, bits[key]) for key in (*known, *fresh)])
            row.value_count += len(fresh)
            if untrusted is not None:
                source, flagged, score = untrusted
                sources = orjson.loads(row.sources)
                if source not in sources and len(sources) < MAX_SOURCES:
                    row.sources = orjson.dumps([*sources, source]).decode()
                row.tainted = True
                row.flagged = row.flagged or flagged
                row.max_score = max(row.max_score, score)
            return _state(row)

    def _lookup(self, tenant: str, session: str, keys: set[bytes]) -> tuple[SessionState, dict[bytes, int]]:
        now = self._clock()
        with self._database.guarded("read the agent session", write=False) as db:
            row = db.get(AgentSession, (tenant, session))
            if row is None or aware(row.expires_at) <= now:
                return SessionState(), {}
            found: dict[bytes, int] = {}
            for chunk in _chunks(keys):
                found.update(
                    (bytes(key), flags)
                    for key, flags in db.execute(
                        select(AgentSessionValue.key, AgentSessionValue.flags).where(
                            AgentSessionValue.tenant == tenant,
                            AgentSessionValue.session == session,
                            AgentSessionValue.key.in_(chunk),
                        )
                    )
                )
            return _state(row), found

    def _spend_call(self, tenant: str, chain: tuple[tuple[str, int | None], ...]) -> str | None:
        """One transaction: the root task's session row is locked first (every chain of a task tree
        starts at its root, so spends of one tree are serialised across workers), then every task's
        count is checked against its limit and, only if all are within, incremented."""
        now = self._clock()
        tasks = [task for task, _ in chain]
        with self._database.guarded("count the tool call") as db:
            root = self._locked(db, tenant, tasks[0], now)
            rows = db.execute(
                select(AgentCallCount.task, AgentCallCount.count, AgentCallCount.expires_at).where(
                    AgentCallCount.tenant == tenant, AgentCallCount.task.in_(tasks)
                )
            ).all()
            current = {task: (int(count) if aware(expires) > now else 0) for task, count, expires in rows}
            for task, limit in chain:
                if limit is not None and current.get(task, 0) + 1 > limit:
                    return task
            for task in tasks:
                counted = (
                    self._insert(AgentCallCount)
                    .values(tenant=tenant, task=task, count=1, expires_at=now + self._count_ttl)
                    .on_conflict_do_update(
                        index_elements=[AgentCallCount.tenant, AgentCallCount.task],
                        # a counter idle past its lifetime starts over, as in the other stores
                        set_={
                            "count": case(
                                (AgentCallCount.expires_at <= now, 1), else_=AgentCallCount.count + 1
                            ),
                            "expires_at": now + self._count_ttl,
                        },
                    )
                )
                db.execute(counted)
            root.calls += 1
        return None

    # Details ----------------------------------------------------------------------------------------
    def _locked(self, db: Session, tenant: str, session: str, now: datetime) -> AgentSession:
        """The session's row, created if missing and locked for this transaction; an expired session
        starts over empty. Its expiry moves to `now + ttl` (this is a write)."""
        expires = now + self._ttl
        db.execute(
            self._insert(AgentSession)
            .values(tenant=tenant, session=session, expires_at=expires)
            .on_conflict_do_nothing(index_elements=[AgentSession.tenant, AgentSession.session])
        )
        row = db.scalars(
            select(AgentSession)
            .where(AgentSession.tenant == tenant, AgentSession.session == session)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        if aware(row.expires_at) <= now:
            db.execute(
                delete(AgentSessionValue).where(
                    AgentSessionValue.tenant == tenant, AgentSessionValue.session == session
                )
            )
            row.tainted, row.flagged, row.max_score, row.calls = False, False, 0, 0
            row.sources, row.value_count = "[]", 0
        row.expires_at = expires
        return row

    def _existing(self, db: Session, tenant: str, session: str, keys: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        for chunk in _chunks(keys):
            found.update(
                bytes(key)
                for key in db.scalars(
                    select(AgentSessionValue.key).where(
                        AgentSessionValue.tenant == tenant,
                        AgentSessionValue.session == session,
                        AgentSessionValue.key.in_(chunk),
                    )
                )
            )
        return found

    def _or_flags(self, db: Session, tenant: str, session: str, items: list[tuple[bytes, int]]) -> None:
        """flags |= bits for each key, inserting missing keys: one atomic upsert per chunk."""
        for start in range(0, len(items), CHUNK):
            rows = [
                {"tenant": tenant, "session": session, "key": key, "flags": flags}
                for key, flags in items[start : start + CHUNK]
            ]
            insert = self._insert(AgentSessionValue).values(rows)
            db.execute(
                insert.on_conflict_do_update(
                    index_elements=[
                        AgentSessionValue.tenant,
                        AgentSessionValue.session,
                        AgentSessionValue.key,
                    ],
                    set_={"flags": AgentSessionValue.flags.op("|")(insert.excluded.flags)},
                )
            )


def _state(row: AgentSession) -> SessionState:
    return SessionState(
        tainted=row.tainted,
        flagged=row.flagged,
        max_injection_score=row.max_score,
        untrusted_sources=set(orjson.loads(row.sources)),
        calls=row.calls,
    )


def _chunks(keys: Iterable[bytes]) -> Iterator[list[bytes]]:
    ordered = list(keys)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]
