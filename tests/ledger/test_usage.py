"""Recording usage: exact under concurrency, idempotent, one bad event fails alone."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
from sqlalchemy import select

from kvgate.gateway.ledger import Billed, Ledger, LedgerError, NotFound, cost_micros
from kvgate.gateway.ledger.billing import DEFAULT_PRICES
from kvgate.gateway.ledger.models import UsageRow

from .conftest import NOW, event


async def test_10k_events_from_100_tasks_give_exact_totals(ledger: Ledger) -> None:
    tenants = [(await ledger.create_tenant(f"t{i}"))["id"] for i in range(3)]
    rng = random.Random(5)
    plans = [[(rng.choice(tenants), rng.randrange(1, 4000), rng.randrange(0, 300))
              for _ in range(100)] for _ in range(100)]
    expected = {t: [0, 0, 0, 0, 0] for t in tenants}  # requests, prompt, cached, out, cost
    per_day: dict[str, int] = {}
    batches: list[int] = []
    ledger.on_commit = lambda seconds, n: batches.append(n)

    async def worker(w: int) -> None:
        for i, (tenant, prompt, completion) in enumerate(plans[w]):
            e = event(tenant, request_id=f"w{w}-{i}", prompt=prompt, cached=prompt // 3,
                      w5m=prompt // 5, completion=completion,
                      started_at=NOW + timedelta(hours=(w * 100 + i) % 72))
            assert (await ledger.record(e)).new is True
            day = e.started_at.date().isoformat()
            per_day[day] = per_day.get(day, 0) + 1
            totals = expected[tenant]
            for j, v in enumerate((1, prompt, prompt // 3, completion,
                                   cost_micros(e.usage, DEFAULT_PRICES))):
                totals[j] += v

    await asyncio.gather(*(worker(w) for w in range(100)))
    assert ledger.queue_depth() == 0
    assert sum(batches) == 10_000
    assert max(batches) > 1  # concurrent callers really shared transactions

    grand = [sum(col) for col in zip(*expected.values(), strict=True)]
    report = await ledger.usage_report()
    t = report["totals"]
    assert [t["requests"], t["prompt_tokens"], t["cached_tokens"], t["completion_tokens"],
            t["cost_micros"]] == grand
    assert {r["day"]: r["requests"] for r in report["rows"]} == per_day  # 4 UTC days
    for tenant in tenants:
        t = (await ledger.usage_report(tenant_id=tenant))["totals"]
        assert [t["requests"], t["prompt_tokens"], t["cached_tokens"], t["completion_tokens"],
                t["cost_micros"]] == expected[tenant]


async def test_same_request_id_bills_once(ledger: Ledger) -> None:
    tid = (await ledger.create_tenant("acme"))["id"]
    first = event(tid, request_id="dup-1", prompt=1000)
    assert (await ledger.record(first)).new is True
    assert (await ledger.record(first)).new is False  # a retry
    # The same id many times in one batch: exactly one caller bills it.
    again = event(tid, request_id="dup-2", prompt=1000)
    results = await asyncio.gather(*(ledger.record(again) for _ in range(20)))
    assert [r.new for r in results].count(True) == 1
    t = (await ledger.usage_report(tenant_id=tid))["totals"]
    assert t["requests"] == 2
    assert t["cost_micros"] == 2 * cost_micros(first.usage, DEFAULT_PRICES)


async def test_idempotency_survives_reopening(db_url: str) -> None:
    led = await Ledger.open(db_url)
    tid = (await led.create_tenant("acme"))["id"]
    e = event(tid, request_id="across-restart")
    assert (await led.record(e)).new is True
    await led.close()
    led = await Ledger.open(db_url)
    try:
        assert (await led.record(e)).new is False
        assert (await led.usage_report())["totals"]["requests"] == 1
    finally:
        await led.close()


async def test_one_bad_event_does_not_fail_its_batch(ledger: Ledger) -> None:
    tid = (await ledger.create_tenant("acme"))["id"]
    good = [event(tid) for _ in range(30)]
    unknown_tenant = event(999_999)
    unknown_key = event(tid, key_id=424_242)  # violates the key foreign key
    results = await asyncio.gather(*(ledger.record(e) for e in good),
                                   ledger.record(unknown_tenant), ledger.record(unknown_key),
                                   return_exceptions=True)
    assert [r.new for r in results[:30]] == [True] * 30
    assert isinstance(results[30], NotFound)
    assert isinstance(results[31], LedgerError)
    assert (await ledger.usage_report())["totals"]["requests"] == 30
    assert ledger.queue_depth() == 0


async def test_a_caller_that_gives_up_still_bills(ledger: Ledger) -> None:
    tid = (await ledger.create_tenant("acme"))["id"]
    task = asyncio.create_task(ledger.record(event(tid, request_id="gone")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.record(event(tid))  # queued behind it: once this returns, both committed
    assert (await ledger.usage_report())["totals"]["requests"] == 2


async def test_close_commits_pending_then_refuses(db_url: str) -> None:
    led = await Ledger.open(db_url)
    tid = (await led.create_tenant("acme"))["id"]
    pending = [asyncio.create_task(led.record(event(tid))) for _ in range(50)]
    await asyncio.sleep(0)
    await led.close()
    assert all(t.result().new is True for t in pending)
    with pytest.raises(LedgerError, match="closed"):
        await led.record(event(tid))
    led = await Ledger.open(db_url)
    assert (await led.usage_report())["totals"]["requests"] == 50
    await led.close()


async def test_report_by_model_and_time_range(ledger: Ledger) -> None:
    a = (await ledger.create_tenant("a"))["id"]
    b = (await ledger.create_tenant("b"))["id"]
    day = timedelta(days=1)
    for i, (tenant, model, when) in enumerate([
            (a, "m1", NOW), (a, "m2", NOW), (a, "m1", NOW + day), (b, "m1", NOW),
            (a, "m2", NOW + 2 * day)]):
        await ledger.record(event(tenant, request_id=f"r{i}", model=model, prompt=10,
                                  w1h=4, completion=1, started_at=when))
    by_model = await ledger.usage_report(tenant_id=a, group_by="model")
    assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [("m1", 2), ("m2", 2)]
    assert by_model["totals"]["cache_write_tokens"] == 16
    ranged = await ledger.usage_report(tenant_id=a, since=NOW + day, until=NOW + 2 * day)
    assert [(r["day"], r["requests"]) for r in ranged["rows"]] == [("2026-03-15", 1)]
    assert ranged["totals"]["prompt_tokens"] == 10
    with pytest.raises(ValueError, match="group_by"):
        await ledger.usage_report(group_by="hour")


async def test_plan_change_prices_new_events_only(ledger: Ledger) -> None:
    tid = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tid, prompt=1_000_000, completion=0))  # 1.00 on default
    await ledger.create_plan("pro", input=3_000_000)
    await ledger.update_tenant(tid, plan="pro")
    await ledger.record(event(tid, prompt=1_000_000, completion=0))
    await ledger.update_plan("pro", input=5_000_000)
    await ledger.record(event(tid, prompt=1_000_000, completion=0))
    assert (await ledger.usage_report(tenant_id=tid))["totals"]["cost_micros"] == 9_000_000


async def test_fast_and_fallback_paths_store_the_same_rows(ledger: Ledger) -> None:
    """SQLite writes new batches with the driver's executemany and falls back to the
    RETURNING insert when a batch holds an id billed before; both must store alike."""
    tid = (await ledger.create_tenant("acme"))["id"]
    when = NOW + timedelta(microseconds=123_456)
    first = event(tid, request_id="fast", started_at=when, w1h=7)
    assert (await ledger.record(first)).new is True
    second = event(tid, request_id="fallback", started_at=when, w1h=7)
    both = await asyncio.gather(ledger.record(first), ledger.record(second))
    assert [b.new for b in both] == [False, True]
    async with ledger.engine.connect() as conn:
        rows = (await conn.execute(
            select(UsageRow.request_id, UsageRow.started_at, UsageRow.finished_at,
                   UsageRow.cost_micros, UsageRow.cache_write_1h_tokens)
            .order_by(UsageRow.request_id))).all()
    cost = cost_micros(first.usage, DEFAULT_PRICES)
    assert [tuple(r) for r in rows] == [("fallback", when, when, cost, 7),
                                        ("fast", when, when, cost, 7)]
    window = await ledger.usage_report(since=when, until=when + timedelta(microseconds=1))
    assert window["totals"]["requests"] == 2


async def test_record_answers_the_billed_cost(ledger: Ledger) -> None:
    """The HTTP layer reports cost from this answer; it must be what the row holds."""
    tid = (await ledger.create_tenant("acme"))["id"]
    e = event(tid, request_id="priced", prompt=500, cached=64, w5m=32, w1h=16, completion=9)
    billed = await ledger.record(e)
    async with ledger.engine.connect() as conn:
        stored = (await conn.execute(select(UsageRow.cost_micros)
                                     .where(UsageRow.request_id == "priced"))).scalar_one()
    assert billed.new and billed.cost_micros == stored == cost_micros(e.usage, DEFAULT_PRICES)
    again = await ledger.record(e)
    assert not again.new and again.cost_micros == stored


def test_the_usage_row_is_the_table() -> None:
    """The record-to-row mapping names exactly the table's columns (the SQLite fast path
    is compiled from the same table), so a new column cannot be silently dropped."""
    from kvgate.gateway.ledger.committer import usage_row

    columns = {c.name for c in UsageRow.__table__.columns if not c.primary_key}
    assert set(usage_row(event(1), Billed(True, 1, "USD"))) == columns
