"""The size of each tenant's WAL after its last sync attempt.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

While the object store fails, a tenant's read mark keeps every unshipped frame in its WAL,
which grows with the application's writes; ``wal_bytes`` makes that visible in
`tenantsync tenants` and to the API without a stat of every file. Nullable: rows from
before have no figure until their next sync. Written by hand and frozen, as 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("wal_bytes", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants", recreate="auto") as batch:
        batch.drop_column("wal_bytes")
