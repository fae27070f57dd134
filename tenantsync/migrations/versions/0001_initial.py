"""The tenants table.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand and frozen: it does not import the models, so later model changes
cannot change what it creates. Datetimes are ``DateTime(timezone=True)``: timestamptz on
PostgreSQL, UTC text on SQLite (see ``tenantsync.catalogue_schema.UTCDateTime``). ``state`` is
plain text; the model's Enum type checks its values on the way in and out, so adding a
state needs no table rebuild on SQLite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("txid", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("position", sa.JSON(), nullable=True),
        sa.Column("last_write_at", ts, nullable=True),
        sa.Column("last_sync_at", ts, nullable=True),
        sa.Column("last_compact_at", ts, nullable=True),
        sa.Column("last_snapshot_at", ts, nullable=True),
        sa.Column("lease_holder", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", ts, nullable=True),
        sa.Column("bytes_stored", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("archived_txid", sa.BigInteger(), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_tenants"),
    )
    op.create_index("ix_tenants_host_state", "tenants", ["host", "state"])
    op.create_index("ix_tenants_last_write_at", "tenants", ["last_write_at"])


def downgrade() -> None:
    op.drop_index("ix_tenants_last_write_at", table_name="tenants")
    op.drop_index("ix_tenants_host_state", table_name="tenants")
    op.drop_table("tenants")
