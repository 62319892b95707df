"""Revoked token ids: durable in the store, checked per request from memory kept current.

Every replica polls the store for revocations made since its last look (with an overlap, so a row
committed late by another replica is not missed). If the store cannot be read for too long the list is
stale and verification fails closed.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from ztai.errors import StoreError
from ztai.store import Database, RevokedToken

_OVERLAP = timedelta(seconds=30)


class RevocationList:
    def __init__(self, database: Database, *, refresh_seconds: float = 1.0) -> None:
        self._database = database
        self._refresh_seconds = refresh_seconds
        self._revoked: dict[tuple[str, str], float] = {}  # (tenant, jti) -> expiry (epoch seconds)
        self._watermark: datetime | None = None
        self._fresh_at = 0.0

    def is_revoked(self, tenant: str, jti: str) -> bool:
        if time.monotonic() - self._fresh_at > max(5 * self._refresh_seconds, 5.0):
            raise StoreError("revocation list is stale (store unreachable): refusing to accept tokens")
        return (tenant, jti) in self._revoked

    def revoke(self, tenant: str, jti: str, expires_at: float, reason: str = "") -> None:
        """Record a revocation durably (idempotent) and apply it locally at once."""
        now = datetime.now(UTC)
        values = {
            "tenant": tenant,
            "jti": jti,
            "revoked_at": now,
            "expires_at": datetime.fromtimestamp(expires_at, UTC),
            "reason": reason[:500],
        }
        insert = pg_insert if self._database.is_postgres else sqlite_insert
        statement = insert(RevokedToken).values(**values).on_conflict_do_nothing()
        with self._database.transaction() as session:
            session.execute(statement)
        self._revoked[(tenant, jti)] = expires_at

    def refresh(self) -> int:
        """Load revocations newer than the last refresh; prune expired ones. Returns how many are known."""
        now = datetime.now(UTC)
        query = select(RevokedToken.tenant, RevokedToken.jti, RevokedToken.expires_at).where(
            RevokedToken.expires_at > now
        )
        if self._watermark is not None:
            query = query.where(RevokedToken.revoked_at >= self._watermark - _OVERLAP)
        try:
            with self._database.sessions() as session:
                rows = session.execute(query).all()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read revocations: {type(exc).__name__}") from exc
        for tenant, jti, expires_at in rows:
            self._revoked[(tenant, jti)] = _aware(expires_at).timestamp()
        cutoff = time.time() - 300  # keep past the verification leeway
        for key in [k for k, expiry in self._revoked.items() if expiry < cutoff]:
            del self._revoked[key]
        self._watermark = now
        self._fresh_at = time.monotonic()
        return len(self._revoked)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything is stored in UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)
