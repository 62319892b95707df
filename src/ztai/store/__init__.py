"""Persistence: SQLAlchemy tables and engine (SQLite embedded default, PostgreSQL for replicas)."""

from ztai.store.database import Database, open_database
from ztai.store.tables import AuditCheckpoint, AuditEvent, Base, RevokedToken

__all__ = ["AuditCheckpoint", "AuditEvent", "Base", "Database", "RevokedToken", "open_database"]
