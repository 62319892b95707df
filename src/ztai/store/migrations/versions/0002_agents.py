"""Agents: revoked tasks and pending tool-call approvals.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "revoked_tasks",
        sa.Column("tenant", sa.String(255), primary_key=True),
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False, server_default=""),
    )
    op.create_index("ix_revoked_tasks_revoked_at", "revoked_tasks", ["revoked_at"])
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(255), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), nullable=False, index=True),
        sa.Column("principal", sa.String(2048), nullable=False),
        sa.Column("server", sa.String(255), nullable=False),
        sa.Column("tool", sa.String(255), nullable=False),
        sa.Column("call_hash", sa.String(64), nullable=False, index=True),
        sa.Column("preview", sa.String(2000), nullable=False, server_default=""),
        sa.Column("reasons", sa.String(4000), nullable=False, server_default=""),
        sa.Column("decision_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(2048), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("approvals")
    op.drop_table("revoked_tasks")
