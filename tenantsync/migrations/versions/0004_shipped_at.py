"""When each tenant last shipped files to its replica.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Periodic compaction, snapshots and retention pick the tenants that can have work: those
that added files since the plan's previous run. They picked by ``last_sync_at``, which a
pass that finds nothing new also moves, so a tenant whose WAL was touched without a commit
cost listing requests at every level. ``shipped_at`` moves only when files were shipped.
Existing rows take their ``last_sync_at``, which is the most it can be. Written by hand and
frozen, as 0001 (plain ``DateTime(timezone=True)``, as there).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("shipped_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE tenants SET shipped_at = last_sync_at")
    op.create_index("ix_tenants_fleet_shipped_at", "tenants", ["fleet", "shipped_at"])


def downgrade() -> None:
    op.drop_index("ix_tenants_fleet_shipped_at", table_name="tenants")
    with op.batch_alter_table("tenants", recreate="auto") as batch:
        batch.drop_column("shipped_at")
