"""The catalogue's schema, brought to the newest migration when a catalogue is opened.

Its own module because schema versions are a concern of their own: the Alembic
migrations in ``tenantsync/migrations`` (shipped as package data, found through
``MIGRATIONS_DIR``), the version table, and the lock that lets many processes open a fresh
database at once. Alembic is imported only when the schema is not at ``SCHEMA_HEAD``, so
the processes that open a catalogue already at head never load it.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from .catalogue_schema import CatalogueError

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# Our own version table, so a PostgreSQL database shared with an application that uses
# Alembic itself does not mix the two histories.
VERSION_TABLE = "tenantsync_alembic_version"
# The newest migration's revision. A process that finds the schema there skips Alembic,
# whose import (with Mako and Pygments) would weigh on every worker's and watcher's memory;
# tests/test_catalogue.py checks this against the migrations directory.
SCHEMA_HEAD = "0008"
# Key of the PostgreSQL advisory lock held while migrating (any fixed 63-bit number;
# this one is the ASCII of "tsyncmig").
_MIGRATE_LOCK_KEY = 0x7473796E636D6967
# Alembic's ``context`` and ``op`` are process-global proxies: two upgrades running at
# once in one process (two Catalogues opened by two threads) would share them.
_MIGRATE_GUARD = threading.Lock()


def alembic_config(url: str | URL | None = None):
    """An Alembic ``Config`` built in code: ``script_location`` is the package's
    migrations directory, so no ``alembic.ini`` is needed.

    ``upgrade_to_head`` passes its open connection in ``config.attributes["connection"]``.
    For a developer writing the next migration (autogenerate compares against the
    table in ``catalogue_schema``)::

        from alembic import command
        from tenantsync.catalogue import alembic_config
        command.upgrade(alembic_config("sqlite:///scratch.db"), "head")
        command.revision(alembic_config("sqlite:///scratch.db"), "add x", autogenerate=True,
                         rev_id="0002")

    then edit the generated file by hand: migrations are reviewed code.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS_DIR.replace("%", "%%"))
    cfg.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        rendered = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def upgrade_to_head(engine: Engine, dialect: str, what: str) -> None:
    """``alembic upgrade head``, safe when many processes open a fresh database at once.

    Fast path: the schema is at head, nothing is locked. Otherwise the upgrade runs in
    one transaction that first takes a lock every migrating process needs: on
    PostgreSQL a transaction-scoped advisory lock (``pg_advisory_xact_lock``, released
    at commit or rollback, even if the process dies); on SQLite the database write
    lock (``BEGIN IMMEDIATE``). The loser waits, then finds the schema at head and does
    nothing. Both dialects have transactional DDL, so a failed upgrade leaves nothing.
    Within one process a lock also serialises upgrades, as Alembic's ``context`` is
    global. ``what`` names the catalogue in errors. A schema at a revision this code does
    not know (migrated by a newer tenantsync) is refused, not touched.
    """
    current = _schema_version(engine, what)
    if current == {SCHEMA_HEAD}:
        return  # the usual case: every process after the first, without Alembic's import
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = alembic_config()
    known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
    if current - known:
        raise CatalogueError(f"{what}: its schema is at revision {', '.join(sorted(current - known))}, newer than "
                             f"this tenantsync knows (up to {SCHEMA_HEAD}): upgrade tenantsync to use it")
    with engine.connect() as conn:
        if dialect == "sqlite":
            conn.execution_options(tenantsync_begin="IMMEDIATE")
        try:
            with _MIGRATE_GUARD, conn.begin():
                if dialect == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATE_LOCK_KEY)))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (sa.exc.SQLAlchemyError, CommandError) as e:  # CommandError: migrated meanwhile by a newer version
            raise CatalogueError(f"{what}: migrating the schema failed: {e}") from e


def _schema_version(engine: Engine, what: str) -> set[str]:
    """The revisions in the version table (none in a fresh database, which has no such
    table). A database that cannot be read (not a database, no permission, a server
    refusing us) is one clear error, not a migration attempt."""
    table = sa.table(VERSION_TABLE, sa.column("version_num"))
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(VERSION_TABLE):
                return set()
            return set(conn.execute(sa.select(table.c.version_num)).scalars())
    except sa.exc.DBAPIError as e:
        raise CatalogueError(f"{what}: cannot read the schema version: {e.orig or e}") from e
