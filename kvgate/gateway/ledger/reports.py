"""Usage reports: totals and rows per tenant, key, model or day, summed in SQL over the
indexed time range, each cost with the currency it is in.

The currency of a cost is the one each usage row was billed in (its tenant's plan's at the
time), so moving a tenant to a plan in another currency never restates its past costs.
Rows are split by currency as well as by the group, so no row adds up two currencies. When
every row shares one currency the totals name it; otherwise the totals' ``currency`` and
``cost_micros`` are null and ``cost_micros_by_currency`` holds the sums that mean something.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Date, case, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from .errors import InvalidInput
from .models import ApiKey, Tenant, UsageRow
from .timespec import check_range

FIELDS = ("requests", "prompt_tokens", "cached_tokens", "cache_write_tokens",
          "completion_tokens", "reserved_byte_seconds", "stored_token_seconds", "cost_micros")
RESERVATION_ENDPOINT = "cache.reservation"  # rows that bill reserved capacity, not requests
STORAGE_ENDPOINT = "cache.storage"  # rows that bill explicit caches' storage, not requests
NOT_REQUESTS = (RESERVATION_ENDPOINT, STORAGE_ENDPOINT)
GROUPS = ("tenant", "key", "model", "day")


def _sums() -> list[Any]:
    u = UsageRow
    return [
        func.count(case((u.endpoint.notin_(NOT_REQUESTS), 1))).label("requests"),
        func.coalesce(func.sum(u.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(u.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(u.cache_write_5m_tokens + u.cache_write_1h_tokens
                               + u.cache_write_24h_tokens), 0)
        .label("cache_write_tokens"),
        func.coalesce(func.sum(u.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(u.reserved_byte_seconds), 0).label("reserved_byte_seconds"),
        func.coalesce(func.sum(u.stored_token_seconds), 0).label("stored_token_seconds"),
        func.coalesce(func.sum(u.cost_micros), 0).label("cost_micros"),
    ]


def _day(dialect: str) -> ColumnElement[Any]:
    """The UTC calendar day of ``started_at`` (SQLite keeps naive UTC text already)."""
    if dialect == "sqlite":
        return func.date(UsageRow.started_at)
    # A literal, not a bound parameter: GROUP BY must repeat the SELECT expression exactly.
    return cast(func.timezone(literal_column("'UTC'"), UsageRow.started_at), Date)


def _group_columns(group_by: str, dialect: str) -> list[ColumnElement[Any]]:
    """The labelled columns that name one row of the report."""
    if group_by == "tenant":
        return [Tenant.id.label("tenant_id"), Tenant.name.label("tenant_name")]
    if group_by == "key":
        # Events recorded without a key (key_id NULL) form one row of their own.
        return [UsageRow.key_id.label("key_id"), ApiKey.prefix.label("key_prefix"),
                UsageRow.tenant_id.label("tenant_id")]
    if group_by == "model":
        return [UsageRow.model.label("model")]
    return [_day(dialect).label("day")]


def _as_dict(row: Any) -> dict[str, int]:
    # PostgreSQL returns SUM(bigint) as numeric; the numbers are exact integers either way.
    return {name: int(getattr(row, name)) for name in FIELDS}


def _sort_key(row: dict[str, Any], names: list[str]) -> tuple[Any, ...]:
    # NULL sorts last on both backends (SQLite and PostgreSQL disagree in SQL).
    return (*((row[n] is None, row[n]) for n in names), row["currency"])


async def usage_report(conn: AsyncConnection, tenant_id: int | None = None,
                       since: datetime | None = None, until: datetime | None = None,
                       group_by: str = "day") -> dict[str, Any]:
    """``since`` inclusive, ``until`` exclusive, both on the request's start time."""
    if group_by not in GROUPS:
        raise InvalidInput(f"group_by must be one of {', '.join(GROUPS)}; got {group_by!r}")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{name} must be an aware datetime (e.g. UTC)")
    check_range(since, until)
    where = []
    if tenant_id is not None:
        where.append(UsageRow.tenant_id == tenant_id)
    if since is not None:
        where.append(UsageRow.started_at >= since)
    if until is not None:
        where.append(UsageRow.started_at < until)

    keys = _group_columns(group_by, conn.dialect.name)
    currency = UsageRow.currency.label("currency")
    stmt = select(*keys, currency, *_sums()).select_from(UsageRow)
    if group_by == "tenant":
        stmt = stmt.join(Tenant, UsageRow.tenant_id == Tenant.id)
    if group_by == "key":
        stmt = stmt.outerjoin(ApiKey, UsageRow.key_id == ApiKey.id)
    result = await conn.execute(stmt.where(*where).group_by(*keys, currency))

    names = [k.name for k in keys]
    rows = []
    for r in result:
        row: dict[str, Any] = {n: getattr(r, n) for n in names}
        if group_by == "day":
            row["day"] = str(row["day"])  # a date on PostgreSQL, text on SQLite
        rows.append({**row, "currency": r.currency, **_as_dict(r)})
    rows.sort(key=lambda row: _sort_key(row, names))
    return {"group_by": group_by, "totals": _totals(rows), "rows": rows}


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {name: sum(r[name] for r in rows) for name in FIELDS}
    by_currency: dict[str, int] = {}
    for r in rows:
        by_currency[r["currency"]] = by_currency.get(r["currency"], 0) + r["cost_micros"]
    totals["currency"] = next(iter(by_currency)) if len(by_currency) == 1 else None
    if len(by_currency) > 1:
        totals["cost_micros"] = None  # a sum across currencies means nothing
    totals["cost_micros_by_currency"] = dict(sorted(by_currency.items()))
    return totals
