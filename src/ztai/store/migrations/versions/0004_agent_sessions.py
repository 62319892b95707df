"""Agent sessions in the store (several workers or replicas without Redis): taint, value keys, budgets.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "agent_sessions",
        sa.Column("tenant", sa.String(255), primary_key=True),
        sa.Column("session", sa.String(128), primary_key=True),
        sa.Column("tainted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("max_score", sa.Integer, nullable=False, server_default="0"),
        sa.Column("calls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("sources", sa.Text, nullable=False, server_default="[]"),
        sa.Column("value_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "agent_session_values",
        sa.Column("tenant", sa.String(255), primary_key=True),
        sa.Column("session", sa.String(128), primary_key=True),
        sa.Column("key", sa.LargeBinary(16), primary_key=True),
        sa.Column("flags", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "agent_call_counts",
        sa.Column("tenant", sa.String(255), primary_key=True),
        sa.Column("task", sa.String(128), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("agent_call_counts")
    op.drop_table("agent_session_values")
    op.drop_table("agent_sessions")
