"""Rows keyed by fleet and name; marks of hydrations and archivals in progress.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

Two fleets (two apps, each with its own replica) sharing a catalogue had one row for a
tenant name both used, so one fleet's archival could read the other's path and delete its
database. Existing rows get the fleet ``''``: the catalogue does not know which replica
they belonged to; the fleet that finds the same name at the same path adopts the row
(``Catalogue.adopt``). ``mark_owner``/``mark_from`` record who moved a tenant to
hydrating/archiving and from where, so a failure or a dead process is undone.
Written by hand and frozen, as 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tenants_last_write_at", table_name="tenants")
    op.drop_index("ix_tenants_host_state", table_name="tenants")
    # Batch mode: SQLite rebuilds the table (it cannot change a primary key in place);
    # PostgreSQL gets plain ALTERs.
    with op.batch_alter_table("tenants", recreate="auto") as batch:
        batch.add_column(sa.Column("fleet", sa.String(1024), nullable=False, server_default=""))
        batch.add_column(sa.Column("mark_owner", sa.String(255), nullable=True))
        batch.add_column(sa.Column("mark_from", sa.String(16), nullable=True))
        batch.drop_constraint("pk_tenants", type_="primary")
        batch.create_primary_key("pk_tenants", ["fleet", "name"])
    op.create_index("ix_tenants_fleet_host_state", "tenants", ["fleet", "host", "state"])
    op.create_index("ix_tenants_fleet_last_write_at", "tenants", ["fleet", "last_write_at"])


def downgrade() -> None:
    op.drop_index("ix_tenants_fleet_last_write_at", table_name="tenants")
    op.drop_index("ix_tenants_fleet_host_state", table_name="tenants")
    op.execute("DELETE FROM tenants WHERE fleet <> ''")  # one row per name again: only pre-fleet rows fit
    with op.batch_alter_table("tenants", recreate="auto") as batch:
        batch.drop_constraint("pk_tenants", type_="primary")
        batch.create_primary_key("pk_tenants", ["name"])
        batch.drop_column("mark_from")
        batch.drop_column("mark_owner")
        batch.drop_column("fleet")
    op.create_index("ix_tenants_host_state", "tenants", ["host", "state"])
    op.create_index("ix_tenants_last_write_at", "tenants", ["last_write_at"])
