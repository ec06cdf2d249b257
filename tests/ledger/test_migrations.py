"""The same Alembic revisions build, check and tear down the schema on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from kvgate.gateway.ledger import Ledger, SchemaOutdated, migrates_on_start
from kvgate.gateway.ledger import migrate as migrations
from kvgate.gateway.ledger.db import async_url, create_engine
from kvgate.gateway.ledger.models import Base

TABLES = {"plans", "tenants", "api_keys", "usage_events"}


async def _tables(engine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrations.upgrade(engine)
        assert await migrations.current_revision(engine) == migrations.head_revision()
        assert await _tables(engine) >= TABLES
        async with engine.connect() as conn:
            indexes = await conn.run_sync(
                lambda c: {i["name"]: i["column_names"] for i in
                           inspect(c).get_indexes("usage_events")})
        assert indexes["ix_usage_tenant_time"] == ["tenant_id", "started_at"]
        assert indexes["ix_usage_key_time"] == ["key_id", "started_at"]

        await migrations.downgrade(engine, "base")
        assert await migrations.current_revision(engine) is None
        assert not TABLES & await _tables(engine)

        await migrations.upgrade(engine)  # and back up again, from nothing
        assert await _tables(engine) >= TABLES
    finally:
        await engine.dispose()


async def test_models_match_the_migrations(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrations.upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata))
        assert diff == []
    finally:
        await engine.dispose()


async def test_default_plan_exists_out_of_the_box(ledger: Ledger) -> None:
    (plan,) = await ledger.list_plans()
    assert plan["name"] == "default"
    assert plan["cache_read"] * 10 == plan["input"]


async def test_open_without_migrate_refuses_an_old_schema(db_url: str) -> None:
    with pytest.raises(SchemaOutdated, match="kvgate migrate"):
        await Ledger.open(db_url, migrate=False)
    ledger = await Ledger.open(db_url, migrate=True)
    await ledger.close()
    ledger = await Ledger.open(db_url, migrate=False)  # now current: opens
    await ledger.ping()
    await ledger.close()


async def test_unknown_newer_revision_is_refused(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        await migrations.upgrade(engine)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    finally:
        await engine.dispose()
    with pytest.raises(SchemaOutdated, match="does not know"):
        await Ledger.open(sqlite_url, migrate=False)


def test_plain_urls_use_the_async_drivers() -> None:
    assert async_url("sqlite:///a.db") == "sqlite+aiosqlite:///a.db"
    assert async_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert async_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert migrates_on_start("sqlite:///./kvgate.db")
    assert not migrates_on_start("postgresql://u@h/db")
    with pytest.raises(ValueError, match="unsupported"):
        async_url("mysql://u@h/db")
