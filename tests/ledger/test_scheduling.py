"""The scheduling columns (migration 0009): a plan's weight, a tenant's priority floor and
running cap, checked by the ledger and by the database itself, carried by principals."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from kvgate.gateway.ledger import InvalidInput, Ledger
from kvgate.gateway.ledger import migrate as migrations
from kvgate.gateway.ledger.db import create_engine


async def test_the_migration_adds_the_columns_with_their_defaults(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await migrations.upgrade(engine, "0007")
        async with engine.begin() as conn:  # rows from before the revision
            await conn.execute(text("INSERT INTO tenants (name, status, plan_id, "
                                    "cache_ttl_seconds, created_at) VALUES "
                                    "('old', 'active', 1, 300, CURRENT_TIMESTAMP)"))
        await migrations.upgrade(engine)
        async with engine.connect() as conn:
            cols = await conn.run_sync(lambda c: {
                t: {col["name"]: col for col in inspect(c).get_columns(t)}
                for t in ("plans", "tenants")})
            weight = cols["plans"]["scheduling_weight"]
            floor = cols["tenants"]["min_priority"]
            cap = cols["tenants"]["max_running_sequences"]
            assert not weight["nullable"] and not floor["nullable"] and cap["nullable"]
            row = (await conn.execute(text(
                "SELECT t.min_priority, t.max_running_sequences, p.scheduling_weight "
                "FROM tenants t JOIN plans p ON p.id = t.plan_id WHERE t.name = 'old'"))).one()
            assert tuple(row) == (0, None, 1)
        for sql in ("UPDATE plans SET scheduling_weight = 0",
                    "UPDATE plans SET scheduling_weight = 1001",
                    "UPDATE tenants SET min_priority = -1001",
                    "UPDATE tenants SET max_running_sequences = 0"):
            with pytest.raises(IntegrityError):  # the database refuses them too
                async with engine.begin() as conn:
                    await conn.execute(text(sql))
        await migrations.downgrade(engine, "0007")
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: {
                col["name"] for col in inspect(c).get_columns("tenants")})
        assert "min_priority" not in names
    finally:
        await engine.dispose()


async def test_tenants_carry_a_priority_floor_and_a_running_cap(ledger: Ledger) -> None:
    t = await ledger.create_tenant("sched", min_priority=-5, max_running_sequences=3)
    assert (t["min_priority"], t["max_running_sequences"]) == (-5, 3)
    key = await ledger.create_key(t["id"])
    p = await ledger.authenticate(key["key"])
    assert p is not None
    assert (p.min_priority, p.max_running_sequences, p.scheduling_weight) == (-5, 3, 1)
    t = await ledger.update_tenant(t["id"], min_priority=None, max_running_sequences=None)
    assert (t["min_priority"], t["max_running_sequences"]) == (0, None)
    p = await ledger.authenticate(key["key"])  # the update is seen at once on this replica
    assert p is not None and (p.min_priority, p.max_running_sequences) == (0, None)
    plain = await ledger.create_tenant("plain")
    assert (plain["min_priority"], plain["max_running_sequences"]) == (0, None)
    for bad in ({"min_priority": -1001}, {"min_priority": 1001}, {"min_priority": True},
                {"min_priority": 1.5}, {"min_priority": "1"}, {"max_running_sequences": 0},
                {"max_running_sequences": -1}, {"max_running_sequences": 2**31},
                {"max_running_sequences": False}):
        with pytest.raises(InvalidInput):
            await ledger.update_tenant(t["id"], **bad)
        with pytest.raises(InvalidInput):
            await ledger.create_tenant("never", **bad)


async def test_plans_carry_a_scheduling_weight(ledger: Ledger) -> None:
    (default,) = await ledger.list_plans()
    assert default["scheduling_weight"] == 1
    plan = await ledger.create_plan("gold", input=1_000_000, scheduling_weight=4)
    assert plan["scheduling_weight"] == 4
    t = await ledger.create_tenant("vip", plan="gold")
    key = await ledger.create_key(t["id"])
    p = await ledger.authenticate(key["key"])
    assert p is not None and p.scheduling_weight == 4
    plan = await ledger.update_plan("gold", scheduling_weight=1000)
    assert plan["scheduling_weight"] == 1000 and plan["input"] == 1_000_000
    p = await ledger.authenticate(key["key"])  # principals carry the new weight at once
    assert p is not None and p.scheduling_weight == 1000
    assert (await ledger.update_plan("gold", output=7))["scheduling_weight"] == 1000
    for bad in (0, -1, 1001, 2**63, True, 2.0, "3"):
        with pytest.raises(InvalidInput, match="scheduling_weight"):
            await ledger.update_plan("gold", scheduling_weight=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="scheduling_weight"):
            await ledger.create_plan("bad", input=1, scheduling_weight=bad)  # type: ignore[arg-type]


def test_cli_sets_the_scheduling_fields(db_url: str, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    from kvgate.gateway.ledger.cli import main

    def kvgate(*argv: str) -> tuple[int, str, str]:
        rc = main([*argv, "--db", db_url])
        out, err = capsys.readouterr()
        return rc, out, err

    assert kvgate("migrate")[0] == 0
    rc, out, _ = kvgate("plans", "create", "gold", "--input", "1000000",
                        "--scheduling-weight", "3", "--json")
    assert rc == 0 and json.loads(out)["scheduling_weight"] == 3
    rc, out, _ = kvgate("plans", "update", "gold", "--scheduling-weight", "5", "--json")
    assert rc == 0 and json.loads(out)["scheduling_weight"] == 5
    rc, _, err = kvgate("plans", "update", "gold", "--scheduling-weight", "0")
    assert rc == 1 and "scheduling_weight" in err
    rc, out, _ = kvgate("tenants", "create", "vip", "--plan", "gold", "--min-priority", "-10",
                        "--max-running-sequences", "4", "--json")
    tenant = json.loads(out)
    assert rc == 0 and (tenant["min_priority"], tenant["max_running_sequences"]) == (-10, 4)
    rc, _, err = kvgate("tenants", "create", "bad", "--max-running-sequences", "0")
    assert rc == 1 and "max_running_sequences" in err
    rc, out, _ = kvgate("plans", "list")
    assert rc == 0 and "SCHEDULING_WEIGHT" in out.splitlines()[0]
