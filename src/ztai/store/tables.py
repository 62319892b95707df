"""The tables. Every row carries its tenant (the SPIFFE trust domain by default)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class AuditEvent(Base):
    """One leaf of the audit Merkle log. `seq` is the dense, 0-based leaf index."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    body: Mapped[bytes] = mapped_column(LargeBinary)  # canonical JSON; the leaf's input
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditCheckpoint(Base):
    """A signed statement of (tree size, root hash), chained to the previous checkpoint."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tree_size: Mapped[int] = mapped_column(BigInteger, unique=True)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    previous_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))
    # The right edge of the tree at this size (derived, lets the next checkpoint extend it cheaply).
    frontier: Mapped[bytes] = mapped_column(LargeBinary)


class RevokedToken(Base):
    __tablename__ = "revoked_tokens"

    tenant: Mapped[str] = mapped_column(String(255), primary_key=True)
    jti: Mapped[str] = mapped_column(String(128), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(String(500), default="")

    __table_args__ = (Index("ix_revoked_tokens_revoked_at", "revoked_at"),)


class RevokedTask(Base):
    """A revoked agent task: every token of the task and of its sub-tasks is refused."""

    __tablename__ = "revoked_tasks"

    tenant: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(String(500), default="")

    __table_args__ = (Index("ix_revoked_tasks_revoked_at", "revoked_at"),)


class IssuedTaskRecord(Base):
    """An agent task ztai issued (at token exchange): what an admin may revoke in its tenant. Kept until
    its token has expired (a sub-task never outlives its parent), then pruned."""

    __tablename__ = "tasks"

    tenant: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Approval(Base):
    """A tool call held for a human decision (`require_approval`). The arguments are kept only as a
    keyed hash (to match the retried call) and a redacted preview."""

    __tablename__ = "approvals"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(255), index=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    principal: Mapped[str] = mapped_column(String(2048))
    server: Mapped[str] = mapped_column(String(255))
    tool: Mapped[str] = mapped_column(String(255))
    call_hash: Mapped[str] = mapped_column(String(64), index=True)
    preview: Mapped[str] = mapped_column(String(2000), default="")
    reasons: Mapped[str] = mapped_column(String(4000), default="")  # JSON list of policy ids / reasons
    decision_id: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | approved | denied | used
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    decided_by: Mapped[str] = mapped_column(String(2048), default="")


class VaultSession(Base):
    """One tokenization vault (ztai.detect.vault): a principal's session. `scope` is a keyed hash of
    (tenant, principal, session name), so the table names no one; the vault lives until `expires_at`,
    which each use pushes forward."""

    __tablename__ = "vault_sessions"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class VaultEntry(Base):
    """A placeholder of a session vault. `digest` is a keyed hash of (type, value); `sealed` is the
    value encrypted with the session's key (AES-256-GCM, bound to scope and digest), kept only for
    values that may be given back to their owner (null for secrets and what the model wrote)."""

    __tablename__ = "vault_entries"
    __table_args__ = (Index("ux_vault_entries_digest", "scope", "digest", unique=True),)

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    placeholder: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(48))
    number: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    key_id: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AgentSession(Base):
    """An agent task tree's session (ztai.agents.session) when sessions live in the store: the state
    policy sees as context.session. `sources` is a JSON list (bounded); the row lives until `expires_at`,
    which each write pushes forward."""

    __tablename__ = "agent_sessions"

    tenant: Mapped[str] = mapped_column(String(255), primary_key=True)
    session: Mapped[str] = mapped_column(String(128), primary_key=True)
    tainted: Mapped[bool] = mapped_column(Boolean, default=False)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    max_score: Mapped[int] = mapped_column(Integer, default=0)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    sources: Mapped[str] = mapped_column(Text, default="[]")
    value_count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AgentSessionValue(Base):
    """A value key of a session (a keyed 8-byte hash, never the value) and where it was seen (FLAG bits)."""

    __tablename__ = "agent_session_values"

    tenant: Mapped[str] = mapped_column(String(255), primary_key=True)
    session: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[bytes] = mapped_column(LargeBinary(16), primary_key=True)
    flags: Mapped[int] = mapped_column(Integer, default=0)


class AgentCallCount(Base):
    """Tool calls counted against one task (its budget); expires `ttl` after the last call."""

    __tablename__ = "agent_call_counts"

    tenant: Mapped[str] = mapped_column(String(255), primary_key=True)
    task: Mapped[str] = mapped_column(String(128), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class PolicyReload(Base):
    """A request to load the policy directory again (`ztai policy reload`, SIGHUP): the revision that was
    validated. Every worker and replica polls this table and swaps to that revision, or refuses."""

    __tablename__ = "policy_reloads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    revision: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    requested_by: Mapped[str] = mapped_column(String(255), default="")
