"""Session vaults in the store (tables vault_sessions, vault_entries): SQLite or PostgreSQL.

The store is the one durable place every replica shares, so a session's numbering is the same wherever
its requests land. Assigning is one transaction per request that tokenizes something: serialised per session
(SQLite's BEGIN IMMEDIATE; a PostgreSQL advisory lock on the scope), so two requests racing never give
one value two placeholders or two values one placeholder. Blocking: the gateway calls it on a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from ztai.detect.vault import NewEntry, Scope, StoredEntry
from ztai.store import Database, VaultEntry, VaultSession, aware, rows_changed

_ADVISORY_NAMESPACE = 0x7A7476  # PostgreSQL advisory locks of `assign` (two-key space, own namespace)
MAX_FETCH = 1000  # placeholders looked up at once (an answer naming more gets the rest unrestored)


class SqlVaultStore:
    """Session vaults that live `ttl_seconds` after their last use, at most `max_entries` values each."""

    def __init__(
        self,
        database: Database,
        *,
        ttl_seconds: int,
        max_entries: int,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._database = database
        self._ttl = timedelta(seconds=ttl_seconds)
        self._max_entries = max_entries
        self._clock = clock or (lambda: datetime.now(UTC))

    def assign(self, scope: Scope, entries: list[NewEntry]) -> dict[str, str | None]:
        now = self._clock()
        with self._database.guarded("assign vault placeholders") as session:
            if self._database.is_postgres:
                lock = int(scope.id[:8], 16) - 2**31
                session.execute(
                    text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": _ADVISORY_NAMESPACE, "key": lock}
                )
            self._open_session(session, scope, now)
            digests = [entry.digest for entry in entries]
            existing = {
                row.digest: row
                for row in session.scalars(
                    select(VaultEntry).where(VaultEntry.scope == scope.id, VaultEntry.digest.in_(digests))
                )
            }
            assigned: dict[str, str | None] = {}
            for entry in entries:
                row = existing.get(entry.digest)
                if row is not None:
                    if row.sealed is None and entry.sealed is not None:  # now the owner's own value
                        row.sealed, row.key_id = entry.sealed, entry.key_id
                    assigned[entry.digest] = row.placeholder
            fresh = [entry for entry in entries if entry.digest not in existing]
            if fresh:
                assigned.update(self._insert(session, scope, fresh, now))
        return assigned

    def fetch(self, scope: Scope, placeholders: list[str]) -> list[StoredEntry]:
        placeholders = placeholders[:MAX_FETCH]
        now = self._clock()
        with self._database.guarded("read the session vault", write=False) as session:
            live = session.scalar(
                select(VaultSession.scope).where(
                    VaultSession.scope == scope.id, VaultSession.expires_at > now
                )
            )
            if live is None:
                return []
            rows = session.scalars(
                select(VaultEntry).where(
                    VaultEntry.scope == scope.id, VaultEntry.placeholder.in_(placeholders)
                )
            ).all()
        return [StoredEntry(r.placeholder, r.kind, r.digest, r.sealed, r.key_id) for r in rows]

    def forget(self, scope: Scope) -> int:
        with self._database.guarded("forget the session vault") as session:
            removed = rows_changed(session, delete(VaultEntry).where(VaultEntry.scope == scope.id))
            session.execute(delete(VaultSession).where(VaultSession.scope == scope.id))
        return removed

    def purge(self) -> int:
        """Delete expired session vaults; returns how many entries went with them."""
        now = self._clock()
        with self._database.guarded("purge expired session vaults") as session:
            expired = select(VaultSession.scope).where(VaultSession.expires_at <= now)
            removed = rows_changed(session, delete(VaultEntry).where(VaultEntry.scope.in_(expired)))
            session.execute(delete(VaultSession).where(VaultSession.expires_at <= now))
        return removed

    def stats(self) -> dict[str, int]:
        now = self._clock()
        with self._database.guarded("count session vaults", write=False) as session:
            sessions = session.scalar(select(func.count()).where(VaultSession.expires_at > now)) or 0
            entries = session.scalar(select(func.count()).select_from(VaultEntry)) or 0
            sealed = session.scalar(select(func.count()).where(VaultEntry.sealed.is_not(None))) or 0
        return {"live_sessions": sessions, "entries": entries, "sealed_values": sealed}

    # ------------------------------------------------------------------------------------------
    def _open_session(self, session: Session, scope: Scope, now: datetime) -> None:
        """Create the session's row, or push its expiry forward; an expired vault starts over empty."""
        row = session.get(VaultSession, scope.id)
        if row is not None and aware(row.expires_at) <= now:
            session.execute(delete(VaultEntry).where(VaultEntry.scope == scope.id))
            session.delete(row)
            session.flush()
            row = None
        if row is None:
            session.add(
                VaultSession(scope=scope.id, tenant=scope.tenant, created_at=now, expires_at=now + self._ttl)
            )
        elif now + self._ttl - aware(row.expires_at) > self._ttl / 20:
            # Pushed forward in steps of 5% of the lifetime: a conversation resending known values
            # then mostly reads, and no commit has to reach the disk.
            row.expires_at = now + self._ttl

    def _insert(
        self, session: Session, scope: Scope, fresh: list[NewEntry], now: datetime
    ) -> dict[str, str | None]:
        held = session.scalar(select(func.count()).where(VaultEntry.scope == scope.id)) or 0
        kinds = sorted({entry.kind for entry in fresh})
        numbers: dict[str, int] = {
            kind: number or 0
            for kind, number in session.execute(
                select(VaultEntry.kind, func.max(VaultEntry.number))
                .where(VaultEntry.scope == scope.id, VaultEntry.kind.in_(kinds))
                .group_by(VaultEntry.kind)
            )
        }
        assigned: dict[str, str | None] = {}
        for entry in fresh:
            if held >= self._max_entries:
                assigned[entry.digest] = None
                continue
            number = numbers.get(entry.kind, 0) + 1
            numbers[entry.kind] = number
            placeholder = f"<{entry.kind}_{number}>"
            session.add(
                VaultEntry(
                    scope=scope.id,
                    placeholder=placeholder,
                    kind=entry.kind,
                    number=number,
                    digest=entry.digest,
                    sealed=entry.sealed,
                    key_id=entry.key_id,
                    created_at=now,
                )
            )
            held += 1
            assigned[entry.digest] = placeholder
        return assigned
