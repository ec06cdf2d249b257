"""Spend budgets on SQLite and PostgreSQL: spend per key, day and month from one query;
reservations that concurrent requests cannot pass together; settling swaps the worst case
for the billed cost; key budgets apart from the tenant's; periods that reset; a database
that goes away; the schema, the ledger's checks and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import inspect

from kvgate.gateway.ledger import (
    Billed,
    Conflict,
    InvalidInput,
    Ledger,
    LedgerUnavailable,
    NotFound,
    Principal,
)
from kvgate.gateway.ledger import migrate as migrations
from kvgate.gateway.ledger.budgets import MAX_BUDGET, NO_HOLD, BudgetExceeded, Budgets, Hold
from kvgate.gateway.ledger.cli import main
from kvgate.gateway.ledger.db import create_engine
from kvgate.gateway.usage import Usage

from .conftest import NOW, event

# The default plan: 1 micro-unit per input token, 4 per output token
COST_140 = Usage(100, completion_tokens=10)  # 100 + 40


def usage_of(cost: int) -> Usage:
    """A usage that costs exactly ``cost`` micro-units on the default plan."""
    return Usage(cost)


class Clock:
    """The budget's two clocks, moved by hand: wall time (periods) and monotonic (age)."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now, self.t = now, 0.0

    def budgets(self, ledger: Ledger) -> Budgets:
        return Budgets(ledger, clock=lambda: self.t, now=lambda: self.now)


async def principal(ledger: Ledger, tenant_id: int, **budgets: int | None) -> Principal:
    key = await ledger.create_key(tenant_id, **budgets)
    p = await ledger.authenticate(key["key"])
    assert p is not None
    return p


async def spend(ledger: Ledger, holds: list[Hold], p: Principal, cost: int,
                when: datetime = NOW) -> None:
    """Bill one request of ``cost`` for ``p`` and settle the first hold with it."""
    billed = await ledger.record(event(p.tenant_id or 0, p.key_id, prompt=cost, completion=0,
                                       started_at=when))
    assert billed.cost_micros == cost
    holds.pop(0).settle(billed)


async def test_spend_is_read_per_key_day_and_month_in_the_plan_currency(
        ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=1000, budget_monthly_micros=5000)
    k1 = await ledger.create_key(t["id"], budget_daily_micros=300)
    k2 = await ledger.create_key(t["id"])
    other = await ledger.create_tenant("other")
    for key_id, when in ((k1["id"], NOW), (k1["id"], NOW - timedelta(days=3)),
                         (k2["id"], NOW.replace(hour=0)), (None, NOW),
                         (k1["id"], NOW - timedelta(days=14)),  # last month
                         (k1["id"], NOW + timedelta(days=1))):  # tomorrow: not today's
        await ledger.record(event(t["id"], key_id, prompt=100, completion=10, started_at=when))
    await ledger.record(event(other["id"], None, prompt=100, started_at=NOW))
    await ledger.create_plan("euro", 1_000_000, currency="EUR")
    await ledger.update_tenant(t["id"], plan="euro")
    await ledger.record(event(t["id"], k1["id"], prompt=100, started_at=NOW))  # in EUR
    assert await ledger.budget_spend(t["id"], "USD", NOW) == {
        k1["id"]: (140, 420), k2["id"]: (140, 140), None: (140, 140)}
    assert await ledger.budget_spend(t["id"], "EUR", NOW) == {k1["id"]: (140, 140)}

    await ledger.update_tenant(t["id"], plan="default")
    status = await ledger.budget_status(t["id"], NOW)
    assert status["currency"] == "USD"
    assert status["daily"] == {"budget_micros": 1000, "spent_micros": 420,
                               "remaining_micros": 580, "start": "2026-03-14T00:00:00Z",
                               "resets_at": "2026-03-15T00:00:00Z"}
    assert status["monthly"]["spent_micros"] == 700
    assert status["monthly"]["resets_at"] == "2026-04-01T00:00:00Z"
    keys = {k["id"]: k for k in status["keys"]}
    assert keys[k1["id"]]["daily"] == {"budget_micros": 300, "spent_micros": 140,
                                       "remaining_micros": 160}
    assert keys[k2["id"]]["monthly"] == {"budget_micros": None, "spent_micros": 140,
                                         "remaining_micros": None}
    with pytest.raises(NotFound):
        await ledger.budget_status(99999)


async def test_reserve_admits_up_to_the_budget_and_names_the_reset(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=1000)
    p = await principal(ledger, t["id"])
    clock = Clock()
    budgets = clock.budgets(ledger)
    holds: list[Hold] = []
    for _ in range(7):
        holds.append(await budgets.reserve(p, [COST_140]))
        await spend(ledger, holds, p, 140)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(p, [COST_140])
    exc = refused.value
    assert (exc.scope, exc.period, exc.spent, exc.cost, exc.never) == (
        "tenant", "daily", 980, 140, False)
    assert exc.retry_after_s == 12 * 3600  # NOW is noon UTC
    assert "2026-03-15T00:00:00Z" in str(exc) and "980" in str(exc) and "1000" in str(exc)
    # read again from the database: the same 980, nothing counted twice
    clock.t = 10.0
    holds.append(await budgets.reserve(p, [usage_of(20)]))
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(p, [usage_of(1)])
    holds.pop().release()
    # the dearest of the worst cases counts
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(p, [usage_of(1), usage_of(21)])


async def test_concurrent_reservations_never_pass_the_budget_together(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=1000)
    p = await principal(ledger, t["id"])
    budgets = Clock().budgets(ledger)
    queries = []
    real = ledger.budget_spend

    async def slow(*args: Any) -> Any:
        queries.append(args)
        await asyncio.sleep(0.05)  # every request arrives while the first read is running
        return await real(*args)

    monkeypatch.setattr(ledger, "budget_spend", slow)
    results = await asyncio.gather(*(budgets.reserve(p, [COST_140]) for _ in range(20)),
                                   return_exceptions=True)
    holds = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(holds) == 7 and len(refused) == 13
    assert len(queries) == 1  # the concurrent requests shared one query
    assert all(r.reserved == 980 and "held by requests in flight" in str(r) for r in refused)
    for h in holds:
        h.release()
        h.release()  # idempotent
    again = await asyncio.gather(*(budgets.reserve(p, [COST_140]) for _ in range(7)))
    assert len(again) == 7


async def test_settling_swaps_the_worst_case_for_the_billed_cost(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=1000)
    p = await principal(ledger, t["id"])
    budgets = Clock().budgets(ledger)
    holds = [await budgets.reserve(p, [usage_of(900)])]
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(p, [usage_of(101)])
    await spend(ledger, holds, p, 140)  # settled: 760 of the 900 come back
    holds.append(await budgets.reserve(p, [usage_of(860)]))
    with pytest.raises(BudgetExceeded):
        await budgets.reserve(p, [usage_of(1)])
    # a retried request id billed nothing new: it adds nothing
    holds[0].settle(Billed(new=False, cost_micros=860, currency="USD"))
    assert (await budgets.reserve(p, [usage_of(860)])) is not NO_HOLD


async def test_a_key_budget_is_its_own_and_the_tenant_budget_spans_its_keys(
        ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_monthly_micros=700)
    capped = await principal(ledger, t["id"], budget_daily_micros=300)
    free = await principal(ledger, t["id"])
    budgets = Clock().budgets(ledger)
    holds: list[Hold] = []
    for _ in range(2):
        holds.append(await budgets.reserve(capped, [COST_140]))
        await spend(ledger, holds, capped, 140)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(capped, [COST_140])
    assert (refused.value.scope, refused.value.spent) == ("key", 280)
    assert "this API key's daily budget" in str(refused.value)
    for _ in range(3):  # the other key spends what the tenant has left: 700 - 280
        holds.append(await budgets.reserve(free, [COST_140]))
        await spend(ledger, holds, free, 140)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(free, [COST_140])
    assert (refused.value.scope, refused.value.period, refused.value.spent) == (
        "tenant", "monthly", 700)
    assert refused.value.resets_at == datetime(2026, 4, 1, tzinfo=UTC)


async def test_budgets_reset_with_the_utc_day_and_month(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=300, budget_monthly_micros=500)
    p = await principal(ledger, t["id"])
    clock = Clock(datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC))
    budgets = clock.budgets(ledger)
    holds: list[Hold] = []
    for _ in range(2):
        holds.append(await budgets.reserve(p, [COST_140]))
        await spend(ledger, holds, p, 140, clock.now)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(p, [COST_140])
    assert refused.value.retry_after_s == 1.0
    clock.now = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)  # a new day and a new month
    for _ in range(2):
        holds.append(await budgets.reserve(p, [COST_140]))
        await spend(ledger, holds, p, 140, clock.now)
    clock.now += timedelta(days=1)  # the day resets, the month does not: 280 + 140 + 140
    holds.append(await budgets.reserve(p, [COST_140]))
    await spend(ledger, holds, p, 140, clock.now)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(p, [COST_140])
    assert (refused.value.period, refused.value.spent) == ("monthly", 420)


async def test_a_worst_case_over_the_whole_budget_is_never_admitted(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=100)
    zero = await ledger.create_tenant("frozen", budget_daily_micros=0)
    budgets = Clock().budgets(ledger)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(await principal(ledger, t["id"]), [COST_140])
    assert refused.value.never and "more than this tenant's whole daily budget of" in str(refused.value)
    with pytest.raises(BudgetExceeded) as refused:  # a budget of 0: spent, it resets
        await budgets.reserve(await principal(ledger, zero["id"]), [COST_140])
    assert not refused.value.never


async def test_without_a_budget_nothing_is_read_or_held(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    t = await ledger.create_tenant("acme")
    p = await principal(ledger, t["id"])

    async def never(*args: Any) -> Any:
        raise AssertionError("no budget: no query")

    monkeypatch.setattr(ledger, "budget_spend", never)
    assert await Clock().budgets(ledger).reserve(p, [COST_140]) is NO_HOLD


async def test_with_the_database_away_a_recent_figure_answers_then_503(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=1000)
    p = await principal(ledger, t["id"])
    clock = Clock()
    budgets = clock.budgets(ledger)
    holds = [await budgets.reserve(p, [COST_140])]
    await spend(ledger, holds, p, 140)

    async def away(*args: Any) -> Any:
        raise LedgerUnavailable("database unavailable")

    monkeypatch.setattr(ledger, "budget_spend", away)
    clock.t = 30.0  # past the refresh, within the stale bound: the last figure + own spend
    holds.append(await budgets.reserve(p, [usage_of(860)]))
    holds[0].settle(Billed(new=True, cost_micros=500, currency="USD", spooled=True))
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(p, [usage_of(361)])
    assert refused.value.spent == 640
    clock.t = 61.0
    with pytest.raises(LedgerUnavailable):
        await budgets.reserve(p, [usage_of(1)])
    monkeypatch.undo()
    # back, with the spooled charge still spooled: it counts beside what the query read
    monkeypatch.setattr(ledger, "spool_depth", lambda: 1)
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.reserve(p, [usage_of(361)])
    assert refused.value.spent == 640


async def test_a_deleted_sqlite_file_is_the_database_away(sqlite_url: str) -> None:
    ledger = await Ledger.open(sqlite_url)
    try:
        t = await ledger.create_tenant("acme", budget_daily_micros=1000)
        p = await principal(ledger, t["id"])
        clock = Clock()
        budgets = clock.budgets(ledger)
        (await budgets.reserve(p, [COST_140])).release()
        os.remove(sqlite_url.removeprefix("sqlite:///"))
        clock.t = 5.0
        (await budgets.reserve(p, [COST_140])).release()
        clock.t = 100.0
        with pytest.raises(LedgerUnavailable):
            await budgets.reserve(p, [COST_140])
    finally:
        await ledger.close()


@pytest.mark.parametrize("bad", [-1, MAX_BUDGET + 1, 2**63, 1.5, "100", True, [1]])
async def test_budgets_must_be_non_negative_integers(ledger: Ledger, bad: object) -> None:
    t = await ledger.create_tenant("acme")
    key = await ledger.create_key(t["id"])
    for call in (lambda: ledger.update_tenant(t["id"], budget_daily_micros=bad),
                 lambda: ledger.create_tenant("b", budget_monthly_micros=bad),
                 lambda: ledger.update_key(key["id"], budget_monthly_micros=bad),
                 lambda: ledger.create_key(t["id"], budget_daily_micros=bad)):
        with pytest.raises(InvalidInput):
            await call()


async def test_key_budgets_set_clear_and_show(ledger: Ledger) -> None:
    t = await ledger.create_tenant("acme", budget_daily_micros=MAX_BUDGET)
    assert t["budget_daily_micros"] == MAX_BUDGET and t["budget_monthly_micros"] is None
    key = await ledger.create_key(t["id"], budget_daily_micros=0)
    assert key["budget_daily_micros"] == 0
    p = await ledger.authenticate(key["key"])
    assert p is not None and p.key_budget_daily_micros == 0 and p.has_budget
    assert p.budget_daily_micros == MAX_BUDGET
    updated = await ledger.update_key(key["id"], budget_daily_micros=None,
                                      budget_monthly_micros=5)
    assert (updated["budget_daily_micros"], updated["budget_monthly_micros"]) == (None, 5)
    (listed,) = await ledger.list_keys(t["id"])
    assert listed["budget_monthly_micros"] == 5
    p = await ledger.authenticate(key["key"])  # the change is seen at once on this replica
    assert p is not None and p.key_budget_monthly_micros == 5
    with pytest.raises(InvalidInput, match="allowed"):
        await ledger.update_key(key["id"], role="admin")
    with pytest.raises(InvalidInput, match="only tenant keys"):
        await ledger.create_key(None, role="admin", budget_daily_micros=5)
    with pytest.raises(NotFound):
        await ledger.update_key(999999, budget_daily_micros=5)
    await ledger.revoke_key(key["id"])
    with pytest.raises(Conflict):
        await ledger.update_key(key["id"], budget_daily_micros=5)


async def _columns(engine: Any, table: str) -> set[str]:
    async with engine.connect() as conn:
        return {c["name"] for c in await conn.run_sync(lambda c: inspect(c).get_columns(table))}


async def test_migration_0008_adds_and_drops_the_budget_columns(db_url: str) -> None:
    engine = create_engine(db_url)
    budget = {"budget_daily_micros", "budget_monthly_micros"}
    try:
        await migrations.upgrade(engine, "0007")
        for table in ("tenants", "api_keys"):
            assert not budget & await _columns(engine, table)
        await migrations.upgrade(engine, "0008")
        for table in ("tenants", "api_keys"):
            assert budget <= await _columns(engine, table)
        await migrations.downgrade(engine, "0007")
        for table in ("tenants", "api_keys"):
            assert not budget & await _columns(engine, table)
        await migrations.upgrade(engine)
    finally:
        await engine.dispose()


def _kvgate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse refuses a bad value
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_sets_and_shows_budgets(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", db_url]
    assert _kvgate(capsys, "migrate", *db)[0] == 0
    rc, out, _ = _kvgate(capsys, "tenants", "create", "acme", "--budget-daily", "1000",
                         "--json", *db)
    tenant = json.loads(out)
    assert rc == 0 and tenant["budget_daily_micros"] == 1000
    rc, out, _ = _kvgate(capsys, "tenants", "update", "acme", "--budget-daily", "none",
                         "--budget-monthly", "5000", "--json", *db)
    tenant = json.loads(out)
    assert rc == 0 and (tenant["budget_daily_micros"], tenant["budget_monthly_micros"]) == (
        None, 5000)
    rc, out, _ = _kvgate(capsys, "keys", "create", "acme", "--budget-daily", "300", "--json",
                         *db)
    key = json.loads(out)
    assert rc == 0 and key["budget_daily_micros"] == 300
    rc, out, _ = _kvgate(capsys, "keys", "update", str(key["id"]), "--budget-monthly", "900",
                         "--json", *db)
    assert rc == 0 and json.loads(out)["budget_monthly_micros"] == 900
    for argv in (("tenants", "update", "acme", "--budget-daily", "-5"),
                 ("tenants", "update", "acme", "--budget-daily", "1.5"),
                 ("tenants", "update", "acme", "--budget-monthly", str(MAX_BUDGET + 1)),
                 ("keys", "update", str(key["id"]), "--budget-daily", "lots")):
        rc, _, err = _kvgate(capsys, *argv, *db)
        assert rc == 2 and "micro-units" in err
    rc, _, err = _kvgate(capsys, "tenants", "update", "acme", *db)
    assert rc == 1 and "nothing to change" in err

    async def bill() -> None:
        ledger = await Ledger.open(db_url, migrate=False)
        try:
            await ledger.record(event(tenant["id"], key["id"], prompt=100, completion=10,
                                      started_at=datetime.now(UTC)))
        finally:
            await ledger.close()

    asyncio.run(bill())
    rc, out, _ = _kvgate(capsys, "usage", "--tenant", "acme", "--json", *db)
    budget = json.loads(out)["budget"]
    assert rc == 0 and budget["monthly"]["budget_micros"] == 5000
    assert budget["monthly"]["spent_micros"] == 140 and budget["monthly"]["remaining_micros"] == 4860
    assert budget["keys"][0]["daily"] == {"budget_micros": 300, "spent_micros": 140,
                                          "remaining_micros": 160}
    rc, out, _ = _kvgate(capsys, "usage", "--tenant", "acme", *db)
    lines = out.splitlines()
    assert rc == 0 and any(line.split()[:5] == ["tenant", "monthly", "5000", "140", "4860"]
                           for line in lines)
    assert any(line.split()[:6] == ["key", str(key["id"]), "daily", "300", "140", "160"]
               for line in lines)
