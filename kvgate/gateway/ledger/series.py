"""Usage as a time series, what the operator console draws: the ledger's events summed per
hour or per UTC day (or over the whole range), optionally split by tenant, key or model, in
one SQL GROUP BY that runs the same on SQLite and PostgreSQL.

Tokens come in the kinds ``billing.cost_micros`` prices (the input kinds add up to
``prompt_tokens``); reservation and storage rows count as no request. ``saved_micros`` and
``net_saved_micros`` are priced by the tenant's plan as it is now and rounded down per
answer row; rows are split by currency, as in ``reports``. The fields:
docs/architecture.md, "Ledger".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from .billing import MICROS_PER_MILLION_TOKENS
from .errors import InvalidInput
from .models import ApiKey, Plan, Tenant, UsageRow
from .reports import NOT_REQUESTS
from .timespec import check_range

BUCKETS = ("hour", "day", "all")
SPLITS = ("none", "tenant", "key", "model")
MAX_BUCKETS = 1000  # per answer: 41 days of hours, 1000 days of days
MAX_ROWS = 10_000  # rows of one answer; more sets ``truncated``
MAX_MERGED = 100_000  # rows held while answering; more is refused (InvalidInput)
DEFAULT_SPAN = {"hour": timedelta(hours=24), "day": timedelta(days=30)}
_STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
# The token kinds of the bill (``billing.cost_micros``): uncached input, cache read
# (``cached_tokens``), cache writes by TTL class, output (``completion_tokens``);
# ``cache_write_tokens`` is the write classes together, as in usage reports (added up
# here, not summed again in SQL). ``_SUMMED``: the sums the database answers.
_SUMMED = ("requests", "prompt_tokens", "cached_tokens", "cache_write_5m_tokens",
           "cache_write_1h_tokens", "cache_write_24h_tokens", "completion_tokens",
           "reserved_byte_seconds", "stored_token_seconds", "cost_micros", "errors")
SERIES_FIELDS = ("requests", "prompt_tokens", "uncached_input_tokens", "cached_tokens",
                 "cache_write_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                 "cache_write_24h_tokens", "completion_tokens", "reserved_byte_seconds",
                 "stored_token_seconds", "cost_micros", "errors", "saved_micros", "net_saved_micros")
MAX_MODEL_LEN = 256  # the usage table's model column
MAX_ID = 2**31 - 1  # tenant and key ids: INTEGER columns (32-bit on PostgreSQL)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class SeriesQuery:
    """One question: ``bucket`` (hour, day, or all: one row per split over the range),
    ``split`` (none, tenant, key, model), the filters, and the range (``since`` inclusive,
    ``until`` exclusive, aware datetimes; a bucketed query without ``since`` starts
    ``DEFAULT_SPAN`` before ``until`` or now)."""

    bucket: str = "hour"
    split: str = "none"
    tenant_id: int | None = None
    key_id: int | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def checked(self, now: datetime | None = None) -> SeriesQuery:
        """This query with its defaults filled in, or ``InvalidInput`` saying what is wrong."""
        if self.bucket not in BUCKETS:
            raise InvalidInput(f"bucket must be one of {', '.join(BUCKETS)}; got {self.bucket!r}")
        if self.split not in SPLITS:
            raise InvalidInput(f"group_by must be one of {', '.join(SPLITS)}; got {self.split!r}")
        for name, value in (("since", self.since), ("until", self.until)):
            if value is not None and value.tzinfo is None:
                raise InvalidInput(f"{name} must be an aware datetime (e.g. UTC)")
        if self.model is not None:
            check_model(self.model)
        for name, ident in (("tenant_id", self.tenant_id), ("key_id", self.key_id)):
            if ident is not None and not 0 < ident <= MAX_ID:  # beyond PostgreSQL's INTEGER
                raise InvalidInput(f"{name} must be from 1 to {MAX_ID}")
        since, until = self.since, self.until
        if self.bucket in _STEP:
            end = until or now or datetime.now(UTC)
            try:
                since = since or end - DEFAULT_SPAN[self.bucket]
            except OverflowError:  # the default span would start before year 1
                raise InvalidInput(f"until ({end.isoformat()}) leaves no room for the default "
                                   f"span before it: give since too") from None
            check_range(since, end)
            # buckets the range touches, partial ones at either end included
            last = _floor(end - timedelta(microseconds=1), self.bucket)
            if (last - _floor(since, self.bucket)) / _STEP[self.bucket] + 1 > MAX_BUCKETS:
                raise InvalidInput(f"at most {MAX_BUCKETS} {self.bucket}s per answer: narrow "
                                   f"since/until or use a coarser bucket")
        check_range(since, until)
        return SeriesQuery(self.bucket, self.split, self.tenant_id, self.key_id, self.model,
                           since, until)


def _floor(when: datetime, bucket: str) -> datetime:
    """The start of the UTC hour or day ``when`` falls in."""
    utc = when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return utc.replace(hour=0) if bucket == "day" else utc


def check_model(model: str) -> None:
    """A model filter the database can take as it is: 1 to ``MAX_MODEL_LEN`` characters,
    no control characters (PostgreSQL refuses NUL in text), valid Unicode (no lone
    surrogates, which no driver can encode). ``InvalidInput`` otherwise, on every
    database alike."""
    if not 0 < len(model) <= MAX_MODEL_LEN:
        raise InvalidInput(f"model must be 1 to {MAX_MODEL_LEN} characters")
    if _CONTROL.search(model):
        raise InvalidInput("model must not contain control characters")
    try:
        model.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("model must be valid Unicode text") from None


def _bucket(bucket: str, dialect: str) -> ColumnElement[Any]:
    """The UTC hour or day ``started_at`` falls in (SQLite keeps naive UTC text already)."""
    if dialect == "sqlite":
        fmt = "%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00"
        return func.strftime(fmt, UsageRow.started_at)
    # Literals, not bound parameters: GROUP BY must repeat the SELECT expression exactly.
    return func.date_trunc(literal_column(f"'{bucket}'"),
                           func.timezone(literal_column("'UTC'"), UsageRow.started_at))


def _split_columns(split: str) -> list[ColumnElement[Any]]:
    """The usage table's own columns a split groups by (names are joined on afterwards)."""
    if split == "key":
        return [UsageRow.key_id.label("key_id")]
    if split == "model":
        return [UsageRow.model.label("model")]
    return []


def _sums() -> list[Any]:
    u = UsageRow

    def zero_sum(expr: Any) -> Any:
        return func.coalesce(func.sum(expr), 0)

    return [
        func.count(case((u.endpoint.notin_(NOT_REQUESTS), 1))).label("requests"),
        zero_sum(u.prompt_tokens).label("prompt_tokens"),
        zero_sum(u.cached_tokens).label("cached_tokens"),
        zero_sum(u.cache_write_5m_tokens).label("cache_write_5m_tokens"),
        zero_sum(u.cache_write_1h_tokens).label("cache_write_1h_tokens"),
        zero_sum(u.cache_write_24h_tokens).label("cache_write_24h_tokens"),
        zero_sum(u.completion_tokens).label("completion_tokens"),
        zero_sum(u.reserved_byte_seconds).label("reserved_byte_seconds"),
        zero_sum(u.stored_token_seconds).label("stored_token_seconds"),
        zero_sum(u.cost_micros).label("cost_micros"),
        zero_sum(case((u.status != "ok", 1), else_=0)).label("errors"),
    ]


def _start(value: Any) -> str:
    """A bucket's start as ISO 8601 UTC (text on SQLite, a naive timestamp on PostgreSQL)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


async def usage_series(conn: AsyncConnection, query: SeriesQuery) -> dict[str, Any]:
    """Two steps: the usage rows summed per tenant, bucket, split and currency in one GROUP
    BY over the usage table alone (its indexes, no join per event), then those few sums
    joined to their tenants, plans and keys. A tenant has one plan, so its saving is its
    summed cached tokens times that plan's price."""
    q = query.checked()
    where: list[Any] = []
    for column, value in ((UsageRow.tenant_id, q.tenant_id), (UsageRow.key_id, q.key_id),
                          (UsageRow.model, q.model)):
        if value is not None:
            where.append(column == value)
    if q.since is not None:
        where.append(UsageRow.started_at >= q.since)
    if q.until is not None:
        where.append(UsageRow.started_at < q.until)

    keys = _split_columns(q.split)
    if q.bucket != "all":
        keys = [_bucket(q.bucket, conn.dialect.name).label("start"), *keys]
    # The bucket first: grouped by the tenant first, SQLite would walk the (tenant, time)
    # index over every tenant's whole history instead of the time index over the range.
    group = [*keys, UsageRow.tenant_id.label("tenant_id"), UsageRow.currency.label("currency")]
    sums = (select(*group, *_sums()).where(*where)
            .group_by(*(c.element for c in group)).subquery("sums"))
    priced = Plan.currency == sums.c.currency  # the plan's price means something for these
    named = [Tenant.name.label("tenant_name")]
    if q.split == "key":
        named.append(ApiKey.prefix.label("key_prefix"))
    # The prices, not their products: cached tokens x price is multiplied in Python, exact
    # on both databases (SQLite turns an INTEGER product past 2**63 into a float).
    stmt = (select(sums, *named,
                   case((priced, Plan.input_price), else_=0).label("input_price"),
                   case((priced, Plan.cache_read_price), else_=0).label("read_price"))
            .join(Tenant, sums.c.tenant_id == Tenant.id)
            .join(Plan, Tenant.plan_id == Plan.id))
    if q.split == "key":
        stmt = stmt.outerjoin(ApiKey, sums.c.key_id == ApiKey.id)
    names = [k.name for k in keys]
    if q.split == "tenant":
        names += ["tenant_id", "tenant_name"]
    elif q.split == "key":
        names.append("key_prefix")
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    # Streamed, not fetched whole: the database's rows are per tenant (for its plan's
    # price), so a bucketed answer over every tenant has buckets x tenants of them; memory
    # holds only the merged rows, and those are refused past MAX_MERGED.
    result = await conn.stream(stmt)
    try:
        async for r in result:  # the sums of several tenants that share a row of the answer
            _merge(merged, names, r)
    finally:
        await result.close()
    rows = [_row(row) for row in merged.values()]
    # buckets in time order; one bucket for the range: the busiest first. NULL sorts last.
    busiest = q.bucket == "all"
    rows.sort(key=lambda row: (-row["requests"] if busiest else 0,
                               *((row[n] is None, row[n]) for n in names), row["currency"]))
    ordered = [_ordered(row, names) for row in rows[:MAX_ROWS]]
    return {"bucket": q.bucket, "group_by": q.split,
            "since": q.since.isoformat() if q.since else None,
            "until": q.until.isoformat() if q.until else None,
            # the totals are over every row, those past MAX_ROWS too
            "truncated": len(rows) > MAX_ROWS, "totals": _totals(rows), "rows": ordered}


def _merge(merged: dict[tuple[Any, ...], dict[str, Any]], names: list[str], r: Any) -> None:
    ident = (*(getattr(r, n) for n in names), r.currency)
    row = merged.get(ident)
    if row is None:
        if len(merged) >= MAX_MERGED:
            raise InvalidInput(f"the answer would have more than {MAX_MERGED} rows: narrow "
                               f"since/until, filter by tenant, key or model, or use a "
                               f"coarser bucket")
        row = merged[ident] = {n: getattr(r, n) for n in names}
        row["currency"] = r.currency
        row.update(dict.fromkeys((*_SUMMED, "saved_scaled", "read_scaled"), 0))
    for name in _SUMMED:
        # PostgreSQL returns SUM(bigint) as numeric; they are exact integers either way
        row[name] += int(getattr(r, name))
    cached = int(r.cached_tokens)
    row["saved_scaled"] += cached * int(r.input_price)
    row["read_scaled"] += cached * int(r.read_price)


def _row(row: dict[str, Any]) -> dict[str, Any]:
    if "start" in row:
        row["start"] = _start(row["start"])
    row["cache_write_tokens"] = (row["cache_write_5m_tokens"] + row["cache_write_1h_tokens"]
                                 + row["cache_write_24h_tokens"])
    row["uncached_input_tokens"] = _uncached(row)
    saved, read = row.pop("saved_scaled"), row.pop("read_scaled")
    row["saved_micros"] = saved // MICROS_PER_MILLION_TOKENS  # rounded down: never overstated
    row["net_saved_micros"] = max(0, saved - read) // MICROS_PER_MILLION_TOKENS
    return row


def _uncached(row: dict[str, Any]) -> int:
    """Prompt tokens billed at the input price: neither read from nor written to the cache
    (``Usage.uncached_tokens``, summed)."""
    return int(row["prompt_tokens"] - row["cached_tokens"] - row["cache_write_tokens"])


def _ordered(row: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Name columns first (tenant id before name), then currency, then the figures."""
    first = [n for n in ("start", "tenant_id", "tenant_name", "key_id", "key_prefix", "model")
             if n in names]
    return {**{n: row[n] for n in first}, "currency": row["currency"],
            **{n: row[n] for n in SERIES_FIELDS}}


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {name: sum(r[name] for r in rows)
                              for name in (*_SUMMED, "cache_write_tokens")}
    totals["uncached_input_tokens"] = _uncached(totals)
    money: dict[str, dict[str, int]] = {"cost_micros": {}, "saved_micros": {},
                                        "net_saved_micros": {}}
    for r in rows:
        for name, by_currency in money.items():
            by_currency[r["currency"]] = by_currency.get(r["currency"], 0) + r[name]
    one = len(money["cost_micros"]) == 1
    totals["currency"] = next(iter(money["cost_micros"])) if one else None
    for name, by_currency in money.items():
        # a sum across currencies means nothing: null, and the sums by currency instead
        totals[name] = next(iter(by_currency.values())) if one else (0 if not rows else None)
        totals[f"{name}_by_currency"] = dict(sorted(by_currency.items()))
    return totals
