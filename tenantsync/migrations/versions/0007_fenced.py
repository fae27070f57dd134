"""Fenced copies: a host's local files of a tenant another host has taken over.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

A host that comes back after its tenants failed over finds their replicas written by
another host. It must neither upload its copy (that would write over the other host's
commits) nor delete it (it may hold commits the replica never got): it moves the files
aside and records them here, one row per (fleet, host, name), until an operator decides.
Written by hand and frozen, as 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fenced",
        sa.Column("fleet", sa.String(1024), nullable=False, server_default=""),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("aside", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("fenced_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("fleet", "host", "name"),
    )


def downgrade() -> None:
    op.drop_table("fenced")
