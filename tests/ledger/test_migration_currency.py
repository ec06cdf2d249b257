"""Revision 0002 adds ``plans.currency``: plans made before it become USD, the column is
dropped again on downgrade (SQLite too, while tenants refer to the plans), and the models
match the schema at head (``test_migrations.test_models_match_the_migrations``)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import inspect, text

from kvgate.gateway.ledger import Ledger
from kvgate.gateway.ledger import migrate as migrations
from kvgate.gateway.ledger.db import create_engine


async def _plan_columns(engine) -> set[str]:
    async with engine.connect() as conn:
        return {c["name"] for c in await conn.run_sync(
            lambda c: inspect(c).get_columns("plans"))}


async def test_existing_plans_become_usd_and_downgrade_drops_the_column(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrations.upgrade(engine, "0001")
        assert "currency" not in await _plan_columns(engine)
        now = datetime.now(UTC)
        if engine.dialect.name == "sqlite":
            now = now.replace(tzinfo=None)
        async with engine.begin() as conn:  # a plan and a tenant on it, written by 0001
            await conn.execute(text(
                "INSERT INTO plans (name, input_price, cache_read_price, cache_write_5m_price,"
                " cache_write_1h_price, output_price, created_at)"
                " VALUES ('legacy', 7, 1, 9, 14, 28, :now)"), {"now": now})
            await conn.execute(text(
                "INSERT INTO tenants (name, status, plan_id, cache_ttl_seconds, created_at)"
                " SELECT 'old-co', 'active', id, 300, :now FROM plans WHERE name = 'legacy'"),
                {"now": now})

        await migrations.upgrade(engine, "0002")
        assert await migrations.current_revision(engine) == "0002"
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT name, currency FROM plans ORDER BY id"))).all()
        assert [tuple(r) for r in rows] == [("default", "USD"), ("legacy", "USD")]

        await migrations.downgrade(engine, "0001")
        assert await migrations.current_revision(engine) == "0001"
        assert "currency" not in await _plan_columns(engine)
        async with engine.connect() as conn:  # the rest of the data is untouched
            tenant = (await conn.execute(text(
                "SELECT t.name, p.name FROM tenants t JOIN plans p ON p.id = t.plan_id"))).one()
        assert tuple(tenant) == ("old-co", "legacy")

        await migrations.upgrade(engine)
        assert "currency" in await _plan_columns(engine)
    finally:
        await engine.dispose()


async def test_a_plan_inserted_without_a_currency_gets_the_default(db_url: str) -> None:
    """The server default, not only the code, gives USD: an older replica or a hand-written
    INSERT that names no currency still leaves a valid plan."""
    ledger = await Ledger.open(db_url)
    try:
        async with ledger.engine.begin() as conn:
            now = datetime.now(UTC)
            if ledger.dialect == "sqlite":
                now = now.replace(tzinfo=None)
            await conn.execute(text(
                "INSERT INTO plans (name, input_price, cache_read_price, cache_write_5m_price,"
                " cache_write_1h_price, output_price, created_at)"
                " VALUES ('by-hand', 1, 1, 1, 1, 1, :now)"), {"now": now})
        plans = {p["name"]: p["currency"] for p in await ledger.list_plans()}
        assert plans == {"default": "USD", "by-hand": "USD"}
    finally:
        await ledger.close()
