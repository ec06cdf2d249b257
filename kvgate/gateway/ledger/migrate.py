"""Alembic, configured in code so no ``alembic.ini`` has to be found at run time.

The revisions ship inside the package (``kvgate/migrations``, package data of the wheel),
found from this module's own path: that works from a source checkout, an editable install
and an installed wheel alike. ``KVGATE_MIGRATIONS`` overrides the location, e.g. for a
deployment that keeps its own copy of the revisions elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import LedgerError, SchemaOutdated

_PG_MIGRATION_LOCK = 0x6B76_6761  # pg_advisory_xact_lock key: one migrator at a time


def migrations_dir() -> Path:
    override = os.environ.get("KVGATE_MIGRATIONS")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise LedgerError(f"ledger migrations not found at {path}: the kvgate installation is "
                          "incomplete; reinstall it, or set KVGATE_MIGRATIONS")
    return path


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade in one transaction (PostgreSQL runs DDL transactionally; concurrent
    replicas starting at once wait on an advisory lock instead of racing)."""

    def run(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        command.upgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: command.downgrade(alembic_config(c), revision))


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda c: MigrationContext.configure(c).get_current_revision())


async def check_schema(engine: AsyncEngine) -> None:
    """Refuse to run on a schema that is older (or newer) than this code's head."""
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return
    script = ScriptDirectory.from_config(alembic_config())
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise SchemaOutdated(
            f"ledger schema is at revision {current}, which this kvgate does not know "
            f"(newest known: {head}); upgrade kvgate")
    raise SchemaOutdated(
        f"ledger schema is at revision {current or 'none (empty database)'}, this kvgate "
        f"needs {head}: run `kvgate migrate --db URL` first")
