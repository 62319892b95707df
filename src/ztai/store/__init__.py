"""Persistence: SQLAlchemy tables and engine (SQLite embedded default, PostgreSQL for replicas)."""

from ztai.store.database import Database, aware, open_database, rows_changed
from ztai.store.tables import (
    AgentCallCount,
    AgentSession,
    AgentSessionValue,
    Approval,
    AuditCheckpoint,
    AuditEvent,
    Base,
    IssuedTaskRecord,
    PolicyReload,
    RevokedTask,
    RevokedToken,
    VaultEntry,
    VaultSession,
)

__all__ = [
    "AgentCallCount",
    "AgentSession",
    "AgentSessionValue",
    "Approval",
    "AuditCheckpoint",
    "AuditEvent",
    "Base",
    "Database",
    "IssuedTaskRecord",
    "PolicyReload",
    "RevokedTask",
    "RevokedToken",
    "VaultEntry",
    "VaultSession",
    "aware",
    "open_database",
    "rows_changed",
]
