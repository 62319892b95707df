"""Persistence: SQLAlchemy tables and engine (SQLite embedded default, PostgreSQL for replicas)."""

from ztai.store.database import Database, open_database
from ztai.store.tables import Approval, AuditCheckpoint, AuditEvent, Base, RevokedTask, RevokedToken

__all__ = [
    "Approval",
    "AuditCheckpoint",
    "AuditEvent",
    "Base",
    "Database",
    "RevokedTask",
    "RevokedToken",
    "open_database",
]
