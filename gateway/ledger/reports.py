"""Usage reports: totals and rows per day or model, summed in SQL over the indexed range."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Date, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from .errors import InvalidInput
from .models import UsageRow

FIELDS = ("requests", "prompt_tokens", "cached_tokens", "cache_write_tokens",
          "completion_tokens", "cost_micros")


def _sums() -> list[Any]:
    u = UsageRow
    return [
        func.count(u.id).label("requests"),
        func.coalesce(func.sum(u.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(u.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(u.cache_write_5m_tokens + u.cache_write_1h_tokens), 0)
        .label("cache_write_tokens"),
        func.coalesce(func.sum(u.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(u.cost_micros), 0).label("cost_micros"),
    ]


def _day(dialect: str) -> ColumnElement[Any]:
    """The UTC calendar day of ``started_at`` (SQLite keeps naive UTC text already)."""
    if dialect == "sqlite":
        return func.date(UsageRow.started_at)
    # A literal, not a bound parameter: GROUP BY must repeat the SELECT expression exactly.
    return cast(func.timezone(literal_column("'UTC'"), UsageRow.started_at), Date)


def _as_dict(row: Any) -> dict[str, int]:
    # PostgreSQL returns SUM(bigint) as numeric; the numbers are exact integers either way.
    return {name: int(getattr(row, name)) for name in FIELDS}


async def usage_report(conn: AsyncConnection, tenant_id: int | None = None,
                       since: datetime | None = None, until: datetime | None = None,
                       group_by: str = "day") -> dict[str, Any]:
    """``since`` inclusive, ``until`` exclusive, both on the request's start time."""
    if group_by not in ("day", "model"):
        raise InvalidInput(f"group_by must be 'day' or 'model', got {group_by!r}")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{name} must be an aware datetime (e.g. UTC)")
    where = []
    if tenant_id is not None:
        where.append(UsageRow.tenant_id == tenant_id)
    if since is not None:
        where.append(UsageRow.started_at >= since)
    if until is not None:
        where.append(UsageRow.started_at < until)

    totals = (await conn.execute(select(*_sums()).where(*where))).one()
    key = (_day(conn.dialect.name) if group_by == "day" else UsageRow.model).label(group_by)
    rows = await conn.execute(select(key, *_sums()).where(*where).group_by(key).order_by(key))
    return {
        "totals": _as_dict(totals),
        "rows": [{group_by: str(r[0]), **_as_dict(r)} for r in rows],
    }
