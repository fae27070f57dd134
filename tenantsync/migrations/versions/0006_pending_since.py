"""Since when each tenant has had writes its replica does not hold yet.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Replication lag (metrics, /readyz, the status page) is how long the oldest unshipped write
has waited. ``last_write_at`` is the newest write and ``last_sync_at`` the last pass, so
neither tells it: a tenant written without pause while its syncs fail would look current by
the first, and a tenant written once after an idle hour would look an hour behind by the
second. ``pending_since`` is set by the first write recorded after a pass and cleared by a
pass that started after the last recorded write. Existing rows start with none pending.
Written by hand and frozen, as 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants", recreate="auto") as batch:
        batch.drop_column("pending_since")
