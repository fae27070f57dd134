"""The etag of each tenant's lease object as last written.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

A tenant released while idle keeps no lease in memory; woken after the lease lapsed, it read
the lease object and then wrote it: two round trips before its first upload. With the etag
of the version it wrote last, one conditional PUT on it renews the lease when nobody took it
over meanwhile (a failed condition falls back to the read). Nullable: rows from before have
none until their next lease write. Written by hand and frozen, as 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("lease_etag", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants", recreate="auto") as batch:
        batch.drop_column("lease_etag")
