"""Alembic environment for the tenant catalogue.

Run in code by ``Catalogue`` (see ``tenantsync.catalogue.alembic_config``): it hands over
an open connection, already inside the transaction that holds the migration lock, in
``config.attributes["connection"]``, and commits when the upgrade returns. Without one
(a developer's ``command.upgrade``/``revision`` call) an engine is made from the
``sqlalchemy.url`` option. Offline mode (``--sql``) renders the SQL for that URL.

Batch mode is on for SQLite, so later migrations can alter columns there too (SQLite's
ALTER TABLE is limited; batch mode rebuilds the table).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from tenantsync.catalogue import METADATA, VERSION_TABLE

config = context.config
target_metadata = METADATA


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: sa.Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            _run_on(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
