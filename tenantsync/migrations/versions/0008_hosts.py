"""Hosts: when each host of a fleet last said it was alive.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Every host's watcher writes its row every few seconds. A host configured for automatic
failover takes over the active tenants of a host whose row went stale. A host with no row
(never seen, or a version before this table) is never taken for dead. Written by hand and
frozen, as 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("fleet", sa.String(1024), nullable=False, server_default=""),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("fleet", "host"),
    )


def downgrade() -> None:
    op.drop_table("hosts")
