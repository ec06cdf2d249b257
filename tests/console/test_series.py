"""``Ledger.usage_series``: usage per hour and per UTC day, or over the range, split by
tenant, key or model, with what the cache saved, on SQLite and PostgreSQL (the ``ledger``
fixture runs every test on both)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kvgate.gateway.ledger import InvalidInput, Ledger
from kvgate.gateway.ledger.series import MAX_BUCKETS, SERIES_FIELDS, SeriesQuery
from tests.ledger.conftest import NOW, event

HOUR, DAY = timedelta(hours=1), timedelta(days=1)
RANGE = {"since": NOW - DAY, "until": NOW + 3 * DAY}


async def _seed(ledger: Ledger) -> dict[str, Any]:
    """``acme`` on the default plan (input 1,000,000 micro-units per million tokens: one
    micro-unit a token; cache reads a tenth of that) with two keys and two models, over
    two hours and a second day; ``euro`` on a EUR plan at twice the price."""
    await ledger.create_plan("euro", input=2_000_000, currency="EUR")
    a = await ledger.create_tenant("acme")
    e = await ledger.create_tenant("euro-co", plan="euro")
    k1, k2 = await ledger.create_key(a["id"]), await ledger.create_key(a["id"])
    ke = await ledger.create_key(e["id"])
    for tenant, key, model, when, prompt, cached, status in [
            (a, k1, "m1", NOW, 100, 40, "ok"),
            (a, k1, "m1", NOW + 59 * timedelta(minutes=1), 100, 60, "ok"),
            (a, k2, "m2", NOW + HOUR, 200, 0, "error"),  # exactly on the hour: the next one
            (a, k2, "m1", NOW + DAY, 300, 250, "ok"),
            (e, ke, "m1", NOW + 2 * HOUR, 1000, 500, "cancelled")]:
        await ledger.record(event(tenant["id"], key["id"], model=model, started_at=when,
                                  prompt=prompt, cached=cached, completion=0, status=status))
    return {"a": a, "e": e, "k1": k1, "k2": k2, "ke": ke}


def _pick(rows: list[dict[str, Any]], *names: str) -> list[tuple[Any, ...]]:
    return [tuple(r[n] for n in names) for r in rows]


async def test_hours_start_on_the_hour_in_utc(ledger: Ledger) -> None:
    s = await _seed(ledger)
    series = await ledger.usage_series(SeriesQuery("hour", tenant_id=s["a"]["id"], **RANGE))
    assert (series["bucket"], series["group_by"], series["truncated"]) == ("hour", "none", False)
    assert _pick(series["rows"], "start", "requests", "prompt_tokens", "cached_tokens",
                 "errors", "saved_micros", "net_saved_micros") == [
        ("2026-03-14T12:00:00Z", 2, 200, 100, 0, 100, 90),
        ("2026-03-14T13:00:00Z", 1, 200, 0, 1, 0, 0),
        ("2026-03-15T12:00:00Z", 1, 300, 250, 0, 250, 225),
    ]
    for row in series["rows"]:
        assert set(row) == {"start", "currency", *SERIES_FIELDS}
    totals = series["totals"]
    assert (totals["requests"], totals["cached_tokens"], totals["saved_micros"],
            totals["currency"]) == (4, 350, 350, "USD")
    assert totals["cost_micros"] == sum(r["cost_micros"] for r in series["rows"])


async def test_days_and_currencies(ledger: Ledger) -> None:
    await _seed(ledger)
    series = await ledger.usage_series(SeriesQuery("day", **RANGE))
    assert _pick(series["rows"], "start", "currency", "requests", "cached_tokens",
                 "saved_micros", "errors") == [
        ("2026-03-14T00:00:00Z", "EUR", 1, 500, 1000, 1),  # twice the price per token
        ("2026-03-14T00:00:00Z", "USD", 3, 100, 100, 1),
        ("2026-03-15T00:00:00Z", "USD", 1, 250, 250, 0),
    ]
    totals = series["totals"]
    assert totals["currency"] is None and totals["cost_micros"] is None  # two currencies
    assert totals["saved_micros_by_currency"] == {"EUR": 1000, "USD": 350}


async def test_split_by_tenant_key_and_model_over_the_range(ledger: Ledger) -> None:
    s = await _seed(ledger)
    by_tenant = await ledger.usage_series(SeriesQuery("all", "tenant", **RANGE))
    assert _pick(by_tenant["rows"], "tenant_id", "tenant_name", "requests", "saved_micros") == [
        (s["a"]["id"], "acme", 4, 350), (s["e"]["id"], "euro-co", 1, 1000)]
    by_key = await ledger.usage_series(SeriesQuery("all", "key", tenant_id=s["a"]["id"]))
    assert sorted(_pick(by_key["rows"], "key_id", "requests", "cached_tokens")) == sorted([
        (s["k1"]["id"], 2, 100), (s["k2"]["id"], 2, 250)])
    assert {r["key_prefix"] for r in by_key["rows"]} == {s["k1"]["prefix"], s["k2"]["prefix"]}
    by_model = await ledger.usage_series(SeriesQuery("day", "model", tenant_id=s["a"]["id"],
                                                     **RANGE))
    assert _pick(by_model["rows"], "start", "model", "requests") == [
        ("2026-03-14T00:00:00Z", "m1", 2), ("2026-03-14T00:00:00Z", "m2", 1),
        ("2026-03-15T00:00:00Z", "m1", 1)]
    one_key = await ledger.usage_series(SeriesQuery("all", key_id=s["k2"]["id"], model="m1"))
    assert _pick(one_key["rows"], "requests", "cached_tokens") == [(1, 250)]


async def test_tokens_come_in_the_kinds_the_bill_prices(ledger: Ledger) -> None:
    """Uncached input, cache read, cache write by TTL class and output, each summed on its
    own, priced as ``cost_micros`` prices them (default plan: input 1 micro-unit a token,
    cache read 0.1, 5m write 1.25, 1h write 2, output 4)."""
    a = await ledger.create_tenant("writer")
    for prompt, cached, w5m, w1h, completion in [(1000, 0, 800, 0, 10),
                                                 (1000, 800, 0, 128, 10),
                                                 (500, 0, 0, 0, 5)]:
        await ledger.record(event(a["id"], prompt=prompt, cached=cached, w5m=w5m, w1h=w1h,
                                  completion=completion))
    series = await ledger.usage_series(SeriesQuery("all", "tenant", tenant_id=a["id"]))
    (row,) = series["rows"]
    kinds = ("prompt_tokens", "uncached_input_tokens", "cached_tokens",
             "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_write_tokens",
             "completion_tokens")
    assert _pick([row], *kinds) == [(2500, 772, 800, 800, 128, 928, 25)]
    assert row["uncached_input_tokens"] + row["cached_tokens"] + row["cache_write_tokens"] \
        == row["prompt_tokens"]
    # per event, rounded up: 200+1000+40 = 1240; 72+80+256+40 = 448; 500+20 = 520
    assert row["cost_micros"] == 1240 + 448 + 520
    totals = series["totals"]
    assert tuple(totals[k] for k in kinds) == (2500, 772, 800, 800, 128, 928, 25)


async def test_a_plan_in_another_currency_saves_nothing_it_cannot_price(ledger: Ledger) -> None:
    s = await _seed(ledger)
    await ledger.update_tenant(s["a"]["id"], plan="euro")  # past rows stay USD
    series = await ledger.usage_series(SeriesQuery("all", tenant_id=s["a"]["id"]))
    assert _pick(series["rows"], "currency", "cached_tokens", "saved_micros") == [
        ("USD", 350, 0)]


async def test_an_empty_range_is_an_empty_series(ledger: Ledger) -> None:
    await _seed(ledger)
    series = await ledger.usage_series(SeriesQuery(
        "hour", since=NOW - 10 * DAY, until=NOW - 9 * DAY))
    assert series["rows"] == []
    assert series["totals"]["requests"] == 0 and series["totals"]["cost_micros"] == 0


@pytest.mark.parametrize("query, message", [
    (SeriesQuery("minute"), "bucket must be one of"),
    (SeriesQuery("hour", "plan"), "group_by must be one of"),
    (SeriesQuery("hour", since=NOW, until=NOW), "must be after"),
    (SeriesQuery("hour", since=NOW - (MAX_BUCKETS + 1) * HOUR, until=NOW), "at most"),
    (SeriesQuery("day", since=NOW.replace(tzinfo=None)), "aware"),
])
async def test_bad_queries_are_refused(ledger: Ledger, query: SeriesQuery,
                                       message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        await ledger.usage_series(query)


def test_bucketed_queries_default_to_a_recent_range() -> None:
    now = datetime(2026, 3, 14, 12, tzinfo=UTC)
    assert SeriesQuery("hour").checked(now).since == now - DAY
    assert SeriesQuery("day").checked(now).since == now - 30 * DAY
    assert SeriesQuery("all").checked(now).since is None
