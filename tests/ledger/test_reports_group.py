"""Usage reports grouped by tenant, key, model and day, each cost with its currency, on
SQLite and PostgreSQL (the ``ledger`` fixture runs every test on both)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from kvgate.gateway.ledger import InvalidInput, Ledger, NotFound
from kvgate.gateway.ledger.reports import FIELDS
from kvgate.gateway.ledger.timespec import parse_time

from .conftest import NOW, event

DAY = timedelta(days=1)


async def _seed(ledger: Ledger) -> dict[str, Any]:
    """Two USD tenants (two keys for one), one EUR tenant, two models, three days, and one
    event without a key. Each event costs exactly prompt micro-units on the default plan
    (1,000,000 per million input tokens), and twice that on the EUR plan."""
    await ledger.create_plan("euro", input=2_000_000, currency="eur")
    a = await ledger.create_tenant("acme")
    b = await ledger.create_tenant("bolt")
    e = await ledger.create_tenant("euro-co", plan="euro")
    ka1 = await ledger.create_key(a["id"])
    ka2 = await ledger.create_key(a["id"])
    kb = await ledger.create_key(b["id"])
    ke = await ledger.create_key(e["id"])
    for tenant, key, model, when, prompt in [
            (a, ka1, "m1", NOW, 100), (a, ka1, "m2", NOW, 200), (a, ka2, "m1", NOW + DAY, 300),
            (b, kb, "m1", NOW, 400), (b, None, "m2", NOW + 2 * DAY, 500),
            (e, ke, "m1", NOW + DAY, 600)]:
        await ledger.record(event(tenant["id"], key["id"] if key else None, model=model,
                                  started_at=when, prompt=prompt, completion=0))
    return {"a": a, "b": b, "e": e, "ka1": ka1, "ka2": ka2, "kb": kb, "ke": ke}


def _pick(rows: list[dict[str, Any]], *names: str) -> list[tuple[Any, ...]]:
    return [tuple(r[n] for n in names) for r in rows]


async def test_group_by_tenant_names_each_tenant_and_its_currency(ledger: Ledger) -> None:
    s = await _seed(ledger)
    report = await ledger.usage_report(group_by="tenant")
    assert report["group_by"] == "tenant"
    assert _pick(report["rows"], "tenant_id", "tenant_name", "currency", "requests",
                 "prompt_tokens", "cost_micros") == [
        (s["a"]["id"], "acme", "USD", 3, 600, 600),
        (s["b"]["id"], "bolt", "USD", 2, 900, 900),
        (s["e"]["id"], "euro-co", "EUR", 1, 600, 1200)]
    for row in report["rows"]:
        assert set(row) == {"tenant_id", "tenant_name", "currency", *FIELDS}
    totals = report["totals"]
    assert totals["requests"] == 6 and totals["prompt_tokens"] == 2100
    # Two currencies: no single one to name, and the sums that mean something, apart.
    assert totals["currency"] is None and totals["cost_micros"] is None
    assert totals["cost_micros_by_currency"] == {"EUR": 1200, "USD": 1500}


async def test_group_by_key_names_each_key(ledger: Ledger) -> None:
    s = await _seed(ledger)
    report = await ledger.usage_report(group_by="key")
    keys = [s[k] for k in ("ka1", "ka2", "kb", "ke")]
    assert _pick(report["rows"], "key_id", "key_prefix", "tenant_id", "currency",
                 "requests", "prompt_tokens") == [
        (keys[0]["id"], keys[0]["prefix"], s["a"]["id"], "USD", 2, 300),
        (keys[1]["id"], keys[1]["prefix"], s["a"]["id"], "USD", 1, 300),
        (keys[2]["id"], keys[2]["prefix"], s["b"]["id"], "USD", 1, 400),
        (keys[3]["id"], keys[3]["prefix"], s["e"]["id"], "EUR", 1, 600),
        (None, None, s["b"]["id"], "USD", 1, 500)]  # no key: its own row, last
    assert all(r["key_prefix"] is None or r["key_prefix"].startswith("kvg_")
               for r in report["rows"])


async def test_group_by_model_and_day_split_by_currency(ledger: Ledger) -> None:
    await _seed(ledger)
    by_model = await ledger.usage_report(group_by="model")
    assert _pick(by_model["rows"], "model", "currency", "requests", "cost_micros") == [
        ("m1", "EUR", 1, 1200), ("m1", "USD", 3, 800), ("m2", "USD", 2, 700)]
    by_day = await ledger.usage_report(group_by="day")
    assert _pick(by_day["rows"], "day", "currency", "requests", "prompt_tokens") == [
        ("2026-03-14", "USD", 3, 700), ("2026-03-15", "EUR", 1, 600),
        ("2026-03-15", "USD", 1, 300), ("2026-03-16", "USD", 1, 500)]
    for report in (by_model, by_day):
        assert report["totals"]["requests"] == 6
        assert report["totals"]["cost_micros"] is None  # USD + EUR: no one sum


async def test_one_currency_is_named_in_the_totals(ledger: Ledger) -> None:
    s = await _seed(ledger)
    for group_by in ("tenant", "key", "model", "day"):
        usd = await ledger.usage_report(tenant_id=s["a"]["id"], group_by=group_by)
        assert usd["totals"]["currency"] == "USD"
        assert usd["totals"]["cost_micros_by_currency"] == {"USD": 600}
        assert {r["currency"] for r in usd["rows"]} == {"USD"}
    eur = await ledger.usage_report(tenant_id=s["e"]["id"], group_by="tenant")
    assert eur["totals"]["currency"] == "EUR" and eur["totals"]["cost_micros"] == 1200
    empty = await ledger.usage_report(since=NOW + 10 * DAY)
    assert empty["rows"] == [] and empty["totals"]["requests"] == 0
    assert empty["totals"]["currency"] is None and empty["totals"]["cost_micros"] == 0


async def test_time_range_with_the_shared_parser(ledger: Ledger) -> None:
    await _seed(ledger)
    # since inclusive, until exclusive, on the request's start time in UTC
    report = await ledger.usage_report(since=parse_time("2026-03-15"),
                                       until=parse_time("2026-03-16"), group_by="tenant")
    assert _pick(report["rows"], "tenant_name", "requests") == [("acme", 1), ("euro-co", 1)]
    # 12:00 UTC is 14:00 at +02:00: an aware bound that excludes the events at 12:00 UTC
    later = await ledger.usage_report(since=parse_time("2026-03-14T14:00:01+02:00"),
                                      until=parse_time("2026-03-15T12:00:00Z"))
    assert later["totals"]["requests"] == 0
    naive = await ledger.usage_report(since=parse_time("2026-03-14T12:00:00"),
                                      until=parse_time("2026-03-14T12:00:01"))
    assert naive["totals"]["requests"] == 3  # naive is UTC
    spans = await ledger.usage_report(since=parse_time("2d", now=NOW + 2 * DAY))
    assert spans["totals"]["requests"] == 6


async def test_refusals(ledger: Ledger) -> None:
    with pytest.raises(InvalidInput, match="group_by must be one of tenant, key, model, day"):
        await ledger.usage_report(group_by="week")
    for tenant_id in (4242, 0, 2**31, 2**40):  # past int32: PostgreSQL would refuse the query
        with pytest.raises(NotFound, match=f"tenant {tenant_id} does not exist"):
            await ledger.usage_report(tenant_id=tenant_id)
    with pytest.raises(InvalidInput, match="must be after since"):
        await ledger.usage_report(since=NOW, until=NOW)
    with pytest.raises(InvalidInput, match="aware"):
        await ledger.usage_report(since=NOW.replace(tzinfo=None))


async def test_plans_carry_their_currency(ledger: Ledger) -> None:
    (default,) = await ledger.list_plans()
    assert default["currency"] == "USD"
    plan = await ledger.create_plan("yen", input=150_000_000, currency=" jpy ")
    assert plan["currency"] == "JPY"
    assert (await ledger.create_plan("plain", input=1))["currency"] == "USD"
    for bad in ("EURO", "E1R", "", "€€€", 978):
        with pytest.raises(InvalidInput, match="ISO 4217"):
            await ledger.create_plan(f"bad-{bad}", input=1, currency=bad)  # type: ignore[arg-type]
    updated = await ledger.update_plan("yen", input=160_000_000)
    assert updated["currency"] == "JPY" and updated["input"] == 160_000_000
    with pytest.raises(InvalidInput, match="currency is fixed"):
        await ledger.update_plan("yen", currency="USD")
    assert [p["currency"] for p in await ledger.list_plans()] == ["USD", "JPY", "USD"]


async def test_moving_a_tenant_to_another_currency_keeps_past_costs(ledger: Ledger) -> None:
    """A row keeps the currency it was billed in; a later plan change bills new rows in
    the new currency and restates nothing."""
    await ledger.create_plan("franc", input=3_000_000, currency="CHF")
    tid = (await ledger.create_tenant("mover"))["id"]
    await ledger.record(event(tid, prompt=1000, completion=0))
    await ledger.update_tenant(tid, plan="franc")
    await ledger.record(event(tid, prompt=1000, completion=0))
    report = await ledger.usage_report(tenant_id=tid, group_by="tenant")
    assert report["totals"]["cost_micros_by_currency"] == {"CHF": 3000, "USD": 1000}
