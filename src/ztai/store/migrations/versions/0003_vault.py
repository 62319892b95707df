"""Session tokenization vaults: placeholders and their encrypted values.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "vault_sessions",
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(255), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )
    op.create_table(
        "vault_entries",
        sa.Column("scope", sa.String(64), primary_key=True),
        sa.Column("placeholder", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(48), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=True),
        sa.Column("key_id", sa.String(16), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ux_vault_entries_digest", "vault_entries", ["scope", "digest"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_vault_entries_digest", table_name="vault_entries")
    op.drop_table("vault_entries")
    op.drop_table("vault_sessions")
