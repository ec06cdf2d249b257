"""The ledger: one object the gateway opens at start and closes at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, insert, select, text, update
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import migrate as migrations
from .auth import VISIBLE_PREFIX_LEN, KeyCache, Principal, key_hash, new_key
from .billing import DEFAULT_PLAN, Billed, PlanPrices, Prices, UsageEvent
from .budgets import MAX_BUDGET, PERIODS, iso_z, period_end, period_start
from .committer import GroupCommitter, OnCommit
from .db import SqliteFile, create_engine, sqlite_path
from .errors import (
    CacheBudgetExceeded,
    Conflict,
    InvalidInput,
    LedgerError,
    LedgerFileLost,
    LedgerUnavailable,
    NotFound,
)
from .models import ApiKey, ExplicitCacheRow, Plan, ReceiptRow, Tenant, UsageRow, utcnow
from .receipts import ReceiptKey
from .reports import usage_report
from .series import SeriesQuery, usage_series
from .spool import DEFAULT_MAX_EVENTS, Spool

log = logging.getLogger("kvgate.ledger")

ROLES = ("tenant", "admin")
TENANT_STATUSES = ("active", "suspended")  # "deleted" only through delete_tenant
_LIMIT_FIELDS = ("cache_ttl_seconds", "cache_quota_bytes", "cache_reserved_device_bytes",
                 "cache_reserved_host_bytes", "cache_max_ttl_seconds",
                 "requests_per_minute", "tokens_per_minute", "max_concurrent",
                 "budget_daily_micros", "budget_monthly_micros",
                 "min_priority", "max_running_sequences")
BUDGET_FIELDS = ("budget_daily_micros", "budget_monthly_micros")  # tenants' and keys'
# Request priorities (lower runs first, as vLLM's), and so a tenant's min_priority
PRIORITY_RANGE = (-1000, 1000)
SCHEDULING_WEIGHT_RANGE = (1, 1000)  # a plan's share of the engine relative to weight 1
RESERVATION_FIELDS = ("cache_reserved_device_bytes", "cache_reserved_host_bytes")
MAX_RESERVATION = 1 << 50
DEFAULT_CACHE_TTL_S = 300
DEFAULT_MAX_TTL_S = 86400  # the longest retention class (24h) by default
_MAX_ID = 2**31 - 1  # tenant and key ids are INTEGER columns (32-bit on PostgreSQL)
DEFAULT_CURRENCY = "USD"  # what revision 0002 gives the plans made before currencies
_PRICE_FIELDS = tuple(f.name for f in dataclasses.fields(Prices))
# Errors that say the database is away (not that a statement is wrong): HTTP 503.
_DB_DOWN = (DBAPIError, PoolTimeout, OSError, asyncio.TimeoutError)
_STATEMENT_WRONG = (IntegrityError, DataError, ProgrammingError)


@dataclass(frozen=True)
class Health:
    """What ``/readyz`` reports. ``refusing``: why this replica admits no new requests
    (None while it does); ``database``: ``up``, ``down`` (usage goes to the spool) or
    ``lost`` (its SQLite file was replaced or deleted)."""

    database: str
    spool_events: int
    refusing: str | None
    detail: str | None = None


class Ledger:
    def __init__(self, engine: AsyncEngine, on_commit: OnCommit | None = None,
                 spool: Spool | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        path = sqlite_path(str(engine.url))
        self.sqlite_file = SqliteFile(path) if path is not None else None
        self.spool = spool
        self._committer = GroupCommitter(engine, on_commit=on_commit, spool=spool,
                                         sqlite_file=self.sqlite_file)
        self._keys = KeyCache()
        self._capacity = asyncio.Lock()  # capacity checks of this process, one at a time

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True,
                   on_commit: OnCommit | None = None, spool_dir: str | Path | None = None,
                   spool_max_events: int = DEFAULT_MAX_EVENTS,
                   unreachable_ok: bool = False) -> Ledger:
        """Connect; with ``migrate`` upgrade the schema to head, else refuse an old one.

        ``serve`` on SQLite migrates on start; on PostgreSQL (shared by replicas) it opens
        with ``migrate=False`` so schema changes stay an operator's ``kvgate migrate``.

        ``spool_dir``: where usage waits while the database is away (``spool.py``); what
        an earlier run left there is replayed in the background from now on. Without it,
        ``record`` fails while the database is away. New requests are refused (see
        ``health``) once the spool holds ``spool_max_events``.

        ``unreachable_ok`` (``kvgate route``: it checks keys, bills nothing): a database
        that cannot be reached at start is not an error either, without a spool; keys are
        refused with 503 until it answers.
        """
        engine = create_engine(url)
        unreachable: BaseException | None = None
        try:
            if migrate:
                await migrations.upgrade(engine)
            else:
                await migrations.check_schema(engine)
        except LedgerError:
            await engine.dispose()
            raise
        except _DB_DOWN as exc:
            if migrate or (spool_dir is None and not unreachable_ok):
                await engine.dispose()
                raise LedgerError(f"cannot open ledger database: {exc}") from exc
            # A replica restarting during an outage serves (keys are refused with 503
            # until the database answers) and spools usage; its schema was checked by
            # the replicas that started before the outage.
            unreachable = exc
            if spool_dir is not None:
                log.error("ledger database unreachable at start; serving, usage spooled in "
                          "%s until it is back: %s", spool_dir, exc)
            else:
                log.error("ledger database unreachable at start; serving, keys refused "
                          "(503) until it answers: %s", exc)
        except Exception as exc:
            await engine.dispose()
            raise LedgerError(f"cannot open ledger database: {exc}") from exc
        spool = None
        if spool_dir is not None:
            spool = Spool(spool_dir, spool_max_events)
            try:
                await spool.open()
            except OSError as exc:
                await spool.close()
                await engine.dispose()
                raise LedgerError(f"cannot open the usage spool in {spool_dir}: {exc}") from exc
        ledger = cls(engine, on_commit, spool)
        ledger._committer.start(unreachable)
        return ledger

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection, or ``LedgerUnavailable`` (also when the SQLite file was replaced)."""
        if self.sqlite_file is not None:
            self.sqlite_file.check()
        try:
            async with self.engine.connect() as conn:
                yield conn
        except _STATEMENT_WRONG:
            raise
        except _DB_DOWN as exc:
            raise LedgerUnavailable(f"ledger database unavailable: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction, committed at the end; ``LedgerUnavailable`` as ``_connect``."""
        if self.sqlite_file is not None:
            self.sqlite_file.check()
        try:
            async with self.engine.begin() as conn:
                yield conn
        except _STATEMENT_WRONG:
            raise
        except _DB_DOWN as exc:
            raise LedgerUnavailable(f"ledger database unavailable: {exc}") from exc

    async def close(self) -> None:
        await self._committer.close()
        await self.engine.dispose()

    async def ping(self) -> None:
        """Raises ``LedgerError`` when the database cannot answer a query (or its SQLite
        file is not the one opened)."""
        try:
            async with self._connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            raise LedgerUnavailable(f"database unreachable: {exc}") from exc

    def spool_depth(self) -> int:
        """Usage events waiting in the spool for the database (the gauge for /metrics)."""
        return self.spool.depth if self.spool is not None else 0

    def refusing(self) -> str | None:
        """Why new requests must not be admitted now, or None. The rule: refuse once usage
        could not be kept — the SQLite file was replaced or deleted (checked here, one
        ``stat``; nothing is billed into a file nobody reads), the spool holds ``max_events`` or more, or the database is
        away and the spool cannot be written (or there is none) or answered usage waits in
        memory for it. A database that is away while the spool takes usage does not refuse
        requests: that is what the spool is for. A failing spool is re-tested every
        ``RETEST_S`` and whenever this refuses for it, so a disk that has room again is in
        use again within that, the database still away or not.
        """
        if self.sqlite_file is not None:
            try:
                self.sqlite_file.check()  # one stat per admission: cheap
            except LedgerFileLost as exc:
                return str(exc)
        if self.spool is None:
            down = self._committer.unavailable
            return None if down is None else f"ledger database unavailable: {down}"
        if self.spool.depth >= self.spool.max_events:
            return (f"the usage spool holds {self.spool.depth} events (limit "
                    f"{self.spool.max_events}) waiting for the ledger database")
        if self._committer.unavailable is not None:
            held = len(self._committer.held)
            if self.spool.error is not None or held:
                # Re-tested every ``RETEST_S`` (committer.py) and now, at this request's
                # asking: admission resumes once the spool takes writes again.
                self._committer.kick_retest()
                return self.spool.error or f"{held} usage events wait for the usage spool"
        return None

    async def health(self) -> Health:
        """Readiness: ``refusing`` as above, the database's state (one query) and the
        spool's depth."""
        try:
            await self.ping()
            database, detail = "up", None
        except LedgerError as exc:
            lost = self.sqlite_file is not None and self.sqlite_file.lost is not None
            database, detail = ("lost" if lost else "down"), str(exc)
        refusing = self.refusing()
        if refusing is None and database != "up" and self.spool is None:
            refusing = detail
        return Health(database, self.spool_depth(), refusing, detail)

    # -- metrics hooks ----------------------------------------------------------------

    @property
    def on_commit(self) -> OnCommit | None:
        """Called as ``on_commit(seconds, n_events)`` after every usage COMMIT."""
        return self._committer.on_commit

    @on_commit.setter
    def on_commit(self, fn: OnCommit | None) -> None:
        self._committer.on_commit = fn

    @property
    def receipt_key(self) -> ReceiptKey | None:
        """Signs the receipt stored with each usage event that names one; None: the
        events' receipts are not stored."""
        return self._committer.receipt_key

    @receipt_key.setter
    def receipt_key(self, key: ReceiptKey | None) -> None:
        self._committer.receipt_key = key

    def queue_depth(self) -> int:
        """Usage events submitted and not yet committed (the gauge for /metrics)."""
        return self._committer.pending

    # -- usage ------------------------------------------------------------------------

    async def record(self, event: UsageEvent) -> Billed:
        """Bill one finished request; returns after COMMIT (durable).

        ``Billed.new`` is True when billed now, False when this request id was billed before
        (a retry). ``Billed.cost_micros`` is the event's cost by the tenant's plan, computed
        inside the commit (see ``billing.cost_micros``): callers never price usage again.
        With the database away and a spool, it returns once the event is fsync'd there:
        ``Billed(new=True, spooled=True)`` priced by the tenant's prices as last read (cost
        0 and currency "" when this process never read them; replay then prices it).
        """
        event.validate()
        return await self._committer.submit(event)

    async def receipt(self, receipt_id: str, tenant_id: int) -> dict[str, Any]:
        """The signed receipt ``receipt_id`` of tenant ``tenant_id``. ``NotFound`` alike
        when it does not exist, is another tenant's, or waits in the spool (it is stored
        when the spool is replayed)."""
        if not isinstance(receipt_id, str) or not 0 < len(receipt_id) <= 64:
            raise NotFound("no such receipt")
        async with self._connect() as conn:
            body = (await conn.execute(select(ReceiptRow.body).where(
                ReceiptRow.id == receipt_id, ReceiptRow.tenant_id == tenant_id))
                ).scalar_one_or_none()
        if body is None:
            raise NotFound("no such receipt")
        receipt: dict[str, Any] = json.loads(body)
        return receipt

    async def receipts(self, tenant_id: int, limit: int = 20) -> list[dict[str, Any]]:
        """The tenant's latest receipts, newest first, as summaries: id, request id, time,
        endpoint, status, token counts, cost and currency (the whole receipt: ``receipt``)."""
        limit = max(1, min(int(limit), 200))
        async with self._connect() as conn:
            rows = (await conn.execute(
                select(ReceiptRow.body).where(ReceiptRow.tenant_id == tenant_id)
                .order_by(ReceiptRow.created_at.desc(), ReceiptRow.id).limit(limit))).all()
        out = []
        for (body,) in rows:
            r = json.loads(body)
            out.append({k: r.get(k) for k in ("id", "request_id", "finished_at", "endpoint",
                                              "status", "tokens", "cost_micros", "currency",
                                              "prompt_cache_key")})
        return out

    # -- explicit caches (``/v1/caches``) --------------------------------------------

    async def create_cache(self, cache_id: str, tenant_id: int, *, display_name: str | None,
                           model: str, prefix: str, tokens: int, expires_at: datetime,
                           max_tokens: int | None,
                           max_total_tokens: int | None = None) -> dict[str, Any]:
        """Store a new explicit cache. ``max_tokens``: the most tokens the tenant's live
        caches may hold together, this one included (None: no bound); ``max_total_tokens``
        the same over every tenant's; over either, ``CacheBudgetExceeded`` says how many
        are left. The sums and the insert share one transaction, serialised with every
        other capacity check on the ledger (``_exclusive``)."""
        now = utcnow()
        bounded = {k: v for k, v in (("tenant", max_tokens), ("all", max_total_tokens))
                   if v is not None}
        async with self._capacity_lock(bounded, bounded), self._begin() as conn:
            await _exclusive(conn, bounded, bounded)  # first: before anything is read
            if max_tokens is not None:
                held = await _live_cache_tokens(conn, tenant_id, now)
                if held + tokens > max_tokens:
                    raise CacheBudgetExceeded(tokens, max(0, max_tokens - held), max_tokens)
            if max_total_tokens is not None:
                held = await _live_cache_tokens(conn, None, now)
                if held + tokens > max_total_tokens:
                    raise CacheBudgetExceeded(tokens, max(0, max_total_tokens - held),
                                              max_total_tokens, everyone=True)
            await conn.execute(insert(ExplicitCacheRow).values(
                id=cache_id, tenant_id=tenant_id, display_name=display_name, model=model,
                prefix=prefix, tokens=tokens, created_at=now, expires_at=expires_at))
            return _cache_dict(await _cache_row(conn, cache_id, tenant_id, now))

    async def get_cache(self, cache_id: str, tenant_id: int) -> dict[str, Any]:
        """Tenant ``tenant_id``'s live cache ``cache_id``; ``NotFound`` alike when there is
        none, it is another tenant's, deleted or expired."""
        async with self._connect() as conn:
            return _cache_dict(await _cache_row(conn, cache_id, tenant_id, utcnow()))

    async def list_caches(self, tenant_id: int) -> list[dict[str, Any]]:
        """The tenant's live caches, oldest first."""
        c = ExplicitCacheRow
        async with self._connect() as conn:
            rows = await conn.execute(select(c).where(
                c.tenant_id == tenant_id, c.deleted_at.is_(None), c.expires_at > utcnow())
                .order_by(c.created_at, c.id))
            return [_cache_dict(r) for r in rows]

    async def update_cache(self, cache_id: str, tenant_id: int,
                           expires_at: datetime) -> dict[str, Any]:
        c = ExplicitCacheRow
        async with self._begin() as conn:
            now = utcnow()
            await _cache_row(conn, cache_id, tenant_id, now)
            await conn.execute(update(c).where(c.id == cache_id).values(expires_at=expires_at))
            return _cache_dict(await _cache_row(conn, cache_id, tenant_id, now))

    async def delete_cache(self, cache_id: str, tenant_id: int) -> dict[str, Any]:
        c = ExplicitCacheRow
        async with self._begin() as conn:
            now = utcnow()
            row = await _cache_row(conn, cache_id, tenant_id, now)
            await conn.execute(update(c).where(c.id == cache_id).values(deleted_at=now))
            return _cache_dict(row)

    async def live_cache_ids(self, cache_ids: list[str]) -> set[str]:
        """Those of ``cache_ids`` neither deleted nor expired."""
        c = ExplicitCacheRow
        async with self._connect() as conn:
            rows = await conn.execute(select(c.id).where(
                c.id.in_(cache_ids), c.deleted_at.is_(None), c.expires_at > utcnow()))
            return {r.id for r in rows}

    async def caches_held(self, since: datetime, until: datetime) -> list[dict[str, Any]]:
        """Every tenant's caches that were live at some time in ``[since, until)``, with
        their deletion time (what storage is billed from)."""
        c = ExplicitCacheRow
        async with self._connect() as conn:
            rows = await conn.execute(select(c).where(
                c.created_at < until, c.expires_at > since,
                (c.deleted_at.is_(None)) | (c.deleted_at > since)).order_by(c.id))
            return [_cache_dict(r) for r in rows]

    async def usage_report(self, tenant_id: int | None = None, since: datetime | None = None,
                           until: datetime | None = None, group_by: str = "day"
                           ) -> dict[str, Any]:
        """Totals and rows per ``group_by`` (see ``reports.GROUPS``); a tenant that does
        not exist is ``NotFound`` rather than an empty report."""
        if tenant_id is not None and not 0 < tenant_id <= _MAX_ID:
            raise NotFound(f"tenant {tenant_id} does not exist")
        async with self._connect() as conn:
            if tenant_id is not None:
                await self._tenant_row(conn, tenant_id)
            return await usage_report(conn, tenant_id, since, until, group_by)

    async def usage_series(self, query: SeriesQuery) -> dict[str, Any]:
        """Usage per hour or day (``series``); a filter naming a tenant that does not exist
        is ``NotFound`` rather than an empty series."""
        if query.tenant_id is not None and not 0 < query.tenant_id <= _MAX_ID:
            raise NotFound(f"tenant {query.tenant_id} does not exist")
        async with self._connect() as conn:
            if query.tenant_id is not None:
                await self._tenant_row(conn, query.tenant_id)
            return await usage_series(conn, query)

    # -- spend budgets (``budgets.py``) ------------------------------------------------

    def plan_prices(self, tenant_id: int) -> PlanPrices | None:
        """The tenant's plan as last read with one of its keys (None: not read yet)."""
        return self._committer.plans.get(tenant_id)

    async def budget_spend(self, tenant_id: int, currency: str, now: datetime
                           ) -> dict[int | None, tuple[int, int]]:
        """What the tenant was billed in ``currency`` this UTC day and this UTC month (of
        ``now``), per key (None: rows of no key, such as reservation and storage
        charges): one aggregate query."""
        async with self._connect() as conn:
            return await _budget_spend(conn, tenant_id, currency, now)

    async def budget_status(self, tenant_id: int, now: datetime | None = None
                            ) -> dict[str, Any]:
        """The tenant's budgets and what it, and each of its keys, spent this UTC day and
        month in its plan's currency, as the ledger holds it (requests in flight, and
        usage waiting in a replica's spool, are not in it yet)."""
        if not 0 < tenant_id <= _MAX_ID:
            raise NotFound(f"tenant {tenant_id} does not exist")
        now = now or utcnow()
        async with self._connect() as conn:
            row = (await conn.execute(select(Tenant, Plan.currency.label("plan_currency"))
                                      .join(Plan, Tenant.plan_id == Plan.id)
                                      .where(Tenant.id == tenant_id))).one_or_none()
            if row is None:
                raise NotFound(f"tenant {tenant_id} does not exist")
            keys = (await conn.execute(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                       .order_by(ApiKey.id))).all()
            spend = await _budget_spend(conn, tenant_id, row.plan_currency, now)

        def periods(budgets: tuple[int | None, int | None], spent: tuple[int, int]
                    ) -> dict[str, Any]:
            return {p: {"budget_micros": b, "spent_micros": s,
                        "remaining_micros": None if b is None else max(0, b - s)}
                    for p, b, s in zip(PERIODS, budgets, spent, strict=True)}

        total = (sum(d for d, _ in spend.values()), sum(m for _, m in spend.values()))
        out = periods((row.budget_daily_micros, row.budget_monthly_micros), total)
        for p in PERIODS:
            out[p].update(start=iso_z(period_start(p, now)), resets_at=iso_z(period_end(p, now)))
        return {"tenant_id": tenant_id, "currency": row.plan_currency, **out,
                "keys": [{"id": k.id, "prefix": k.prefix, "revoked": k.revoked_at is not None,
                          **periods((k.budget_daily_micros, k.budget_monthly_micros),
                                    spend.get(k.id, (0, 0)))}
                         for k in keys if k.revoked_at is None or k.id in spend]}

    # -- keys and authentication --------------------------------------------------------

    async def authenticate(self, key: str) -> Principal | None:
        """The principal of a live key, or None; answers from memory for up to a second."""
        if not key:
            return None
        return await self._keys.get(key_hash(key), self._load_principal)

    async def _load_principal(self, digest: str) -> Principal | None:
        """The key's principal, and its tenant's prices remembered for billing while the
        database is away. ``LedgerUnavailable`` when the database cannot answer."""
        stmt = (select(ApiKey.id, ApiKey.role, ApiKey.tenant_id, Tenant,
                       ApiKey.budget_daily_micros.label("key_budget_daily_micros"),
                       ApiKey.budget_monthly_micros.label("key_budget_monthly_micros"),
                       *(getattr(Plan, f"{k}_price") for k in _PRICE_FIELDS),
                       Plan.currency.label("plan_currency"), Plan.name.label("plan_name"),
                       Plan.scheduling_weight.label("plan_scheduling_weight"))
                .outerjoin(Tenant, ApiKey.tenant_id == Tenant.id)
                .outerjoin(Plan, Tenant.plan_id == Plan.id)
                .where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None)))
        async with self._connect() as conn:
            row = (await conn.execute(stmt)).one_or_none()
        if row is None:
            return None
        key_id, role, tenant_id = row[0], row[1], row[2]
        if tenant_id is None:
            return Principal(key_id, role, None, None, "active", DEFAULT_CACHE_TTL_S,
                             None, None, None, None, None)
        if row.status == "deleted":
            return None
        self._committer.remember_prices(tenant_id, PlanPrices(
            Prices(**{k: getattr(row, f"{k}_price") for k in _PRICE_FIELDS}),
            row.plan_currency, row.plan_id, row.plan_name))
        return Principal(key_id, role, tenant_id, row.name, row.status, row.cache_ttl_seconds,
                         row.cache_quota_bytes, row.requests_per_minute, row.tokens_per_minute,
                         row.max_concurrent, row.plan_id, row.cache_reserved_device_bytes,
                         row.cache_reserved_host_bytes, row.cache_max_ttl_seconds,
                         budget_daily_micros=row.budget_daily_micros,
                         budget_monthly_micros=row.budget_monthly_micros,
                         key_budget_daily_micros=row.key_budget_daily_micros,
                         key_budget_monthly_micros=row.key_budget_monthly_micros,
                         min_priority=row.min_priority,
                         max_running_sequences=row.max_running_sequences,
                         scheduling_weight=row.plan_scheduling_weight)

    async def create_key(self, tenant_id: int | None, role: str = "tenant",
                         **budgets: int | None) -> dict[str, Any]:
        """A new key; the plaintext is in this answer only, the database keeps its hash.
        ``budgets``: the key's own ``budget_daily_micros`` / ``budget_monthly_micros``."""
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {ROLES}, got {role!r}")
        if role == "tenant" and tenant_id is None:
            raise InvalidInput("a tenant key needs a tenant_id")
        _check_key_budgets(budgets, role)
        key = new_key()
        async with self._begin() as conn:
            if tenant_id is not None:
                tenant = await self._tenant_row(conn, tenant_id)
                if tenant.status == "deleted":
                    raise Conflict(f"tenant {tenant_id} is deleted")
            digest, prefix, created = key_hash(key), key[:VISIBLE_PREFIX_LEN], utcnow()
            key_id = (await conn.execute(
                insert(ApiKey).values(tenant_id=tenant_id, role=role, prefix=prefix,
                                      key_sha256=digest, created_at=created, **budgets)
                .returning(ApiKey.id))).scalar_one()
        self._keys.invalidate(digest)  # forget a cached miss at once
        return {"id": key_id, "key": key, "prefix": prefix, "tenant_id": tenant_id,
                "role": role, "created_at": created.isoformat(),
                **{f: budgets.get(f) for f in BUDGET_FIELDS}}

    async def update_key(self, key_id: int, **budgets: int | None) -> dict[str, Any]:
        """Set a key's own budgets (``budget_daily_micros``, ``budget_monthly_micros``;
        None clears one). A revoked key's cannot change."""
        async with self._begin() as conn:
            row = (await conn.execute(select(ApiKey).where(ApiKey.id == key_id))).one_or_none()
            if row is None:
                raise NotFound(f"key {key_id} does not exist")
            if row.revoked_at is not None:
                raise Conflict(f"key {key_id} is revoked")
            _check_key_budgets(budgets, row.role)
            if budgets:
                await conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(budgets))
            row = (await conn.execute(select(ApiKey).where(ApiKey.id == key_id))).one()
        self._keys.invalidate(row.key_sha256)
        return _key_dict(row)

    async def revoke_key(self, key_id: int) -> None:
        async with self._begin() as conn:
            row = (await conn.execute(select(ApiKey.key_sha256, ApiKey.revoked_at)
                                      .where(ApiKey.id == key_id))).one_or_none()
            if row is None:
                raise NotFound(f"key {key_id} does not exist")
            if row.revoked_at is None:
                await conn.execute(update(ApiKey).where(ApiKey.id == key_id)
                                   .values(revoked_at=utcnow()))
        self._keys.invalidate(row.key_sha256)

    async def list_keys(self, tenant_id: int | None) -> list[dict[str, Any]]:
        """Keys of a tenant (``None``: the admin keys); never the key itself."""
        cond = ApiKey.tenant_id.is_(None) if tenant_id is None else ApiKey.tenant_id == tenant_id
        async with self._connect() as conn:
            if tenant_id is not None:
                await self._tenant_row(conn, tenant_id)
            rows = await conn.execute(select(ApiKey).where(cond).order_by(ApiKey.id))
            return [_key_dict(r) for r in rows]

    async def bootstrap_admin(self, admin_key: str | None) -> str | None:
        """Given a key, make sure it is a live admin key (idempotent) and return None.
        Given none while no admin key exists, create one and return it to print once."""
        if admin_key:
            digest = key_hash(admin_key)
            async with self._begin() as conn:
                row = (await conn.execute(select(ApiKey.id, ApiKey.role, ApiKey.revoked_at)
                                          .where(ApiKey.key_sha256 == digest))).one_or_none()
                if row is None:
                    await conn.execute(insert(ApiKey).values(
                        tenant_id=None, role="admin", prefix=admin_key[:VISIBLE_PREFIX_LEN],
                        key_sha256=digest, created_at=utcnow()))
                elif row.role != "admin" or row.revoked_at is not None:
                    await conn.execute(update(ApiKey).where(ApiKey.id == row.id)
                                       .values(role="admin", tenant_id=None, revoked_at=None))
            self._keys.invalidate(digest)
            return None
        async with self._connect() as conn:
            live = (await conn.execute(select(func.count(ApiKey.id)).where(
                ApiKey.role == "admin", ApiKey.revoked_at.is_(None)))).scalar_one()
        if live:
            return None
        key: str = (await self.create_key(None, role="admin"))["key"]
        return key

    # -- tenants ----------------------------------------------------------------------

    async def create_tenant(self, name: str, plan: str | int | None = None,
                            cache_ttl_seconds: int | None = None,
                            cache_quota_bytes: int | None = None,
                            cache_reserved_device_bytes: int | None = None,
                            cache_reserved_host_bytes: int | None = None,
                            cache_max_ttl_seconds: int | None = None,
                            requests_per_minute: int | None = None,
                            tokens_per_minute: int | None = None,
                            max_concurrent: int | None = None,
                            min_priority: int | None = None,
                            max_running_sequences: int | None = None,
                            capacity: dict[str, int] | None = None,
                            budget_daily_micros: int | None = None,
                            budget_monthly_micros: int | None = None) -> dict[str, Any]:
        """``capacity``: bytes each reservation field may total over all tenants (the
        replica's tiers); a reservation beyond what is left is a ``Conflict``."""
        name = _check_name(name)
        limits = {"cache_ttl_seconds": cache_ttl_seconds, "cache_quota_bytes": cache_quota_bytes,
                  "cache_reserved_device_bytes": cache_reserved_device_bytes,
                  "cache_reserved_host_bytes": cache_reserved_host_bytes,
                  "cache_max_ttl_seconds": cache_max_ttl_seconds,
                  "requests_per_minute": requests_per_minute,
                  "tokens_per_minute": tokens_per_minute, "max_concurrent": max_concurrent,
                  "budget_daily_micros": budget_daily_micros,
                  "budget_monthly_micros": budget_monthly_micros,
                  "min_priority": min_priority,
                  "max_running_sequences": max_running_sequences}
        _check_limits(limits)
        if limits["min_priority"] is None:
            limits["min_priority"] = 0
        if limits["cache_ttl_seconds"] is None:
            limits["cache_ttl_seconds"] = DEFAULT_CACHE_TTL_S
        if limits["cache_max_ttl_seconds"] is None:
            limits["cache_max_ttl_seconds"] = DEFAULT_MAX_TTL_S
        _check_ttls(limits["cache_ttl_seconds"] or 0, limits["cache_max_ttl_seconds"] or 0)
        async with self._capacity_lock(limits, capacity), self._begin() as conn:
            await _exclusive(conn, limits, capacity)  # first: before anything is read
            plan_row = await self._plan_row(conn, DEFAULT_PLAN if plan is None else plan)
            await _check_reservations(conn, None, limits, capacity)
            try:
                tenant_id = (await conn.execute(insert(Tenant).values(
                    name=name, status="active", plan_id=plan_row.id, created_at=utcnow(),
                    **limits).returning(Tenant.id))).scalar_one()
            except IntegrityError as exc:
                raise Conflict(f"a tenant named {name!r} already exists") from exc
            return _tenant_dict(await self._tenant_row(conn, tenant_id), plan_row.name)

    async def list_tenants(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        stmt = select(Tenant, Plan.name.label("plan")).join(Plan, Tenant.plan_id == Plan.id)
        if not include_deleted:
            stmt = stmt.where(Tenant.status != "deleted")
        async with self._connect() as conn:
            rows = await conn.execute(stmt.order_by(Tenant.id))
            return [_tenant_dict(r, r.plan) for r in rows]

    async def get_tenant(self, tenant_id: int) -> dict[str, Any]:
        async with self._connect() as conn:
            return await self._tenant_dict(conn, tenant_id)

    async def find_tenant(self, name_or_id: str | int) -> dict[str, Any]:
        """By id, or by name (what people type on the command line)."""
        tenant_id = _as_id(name_or_id)
        if tenant_id is not None:
            return await self.get_tenant(tenant_id)
        async with self._connect() as conn:
            tid = (await conn.execute(select(Tenant.id).where(Tenant.name == name_or_id))
                   ).scalar_one_or_none()
            if tid is None:
                raise NotFound(f"no tenant named {name_or_id!r}")
            return await self._tenant_dict(conn, tid)

    async def update_tenant(self, tenant_id: int, capacity: dict[str, int] | None = None,
                            **fields: Any) -> dict[str, Any]:
        """``capacity`` as in ``create_tenant``."""
        allowed = {"name", "plan", "status", *_LIMIT_FIELDS}
        unknown = set(fields) - allowed
        if unknown:
            raise InvalidInput(f"cannot update {sorted(unknown)}; allowed: {sorted(allowed)}")
        values = {k: v for k, v in fields.items() if k in _LIMIT_FIELDS}
        _check_limits(values)
        if values.get("min_priority", 0) is None:
            values["min_priority"] = 0
        if values.get("cache_ttl_seconds", 0) is None:
            values["cache_ttl_seconds"] = DEFAULT_CACHE_TTL_S
        if values.get("cache_max_ttl_seconds", 0) is None:
            values["cache_max_ttl_seconds"] = DEFAULT_MAX_TTL_S
        if "name" in fields:
            values["name"] = _check_name(fields["name"])
        if "status" in fields:
            if fields["status"] not in TENANT_STATUSES:
                raise InvalidInput(f"status must be one of {', '.join(TENANT_STATUSES)} "
                                   "(delete a tenant with DELETE)")
            values["status"] = fields["status"]
        async with self._capacity_lock(values, capacity), self._begin() as conn:
            await _exclusive(conn, values, capacity)  # first: before anything is read
            tenant = await self._tenant_row(conn, tenant_id)
            if tenant.status == "deleted":
                raise Conflict(f"tenant {tenant_id} is deleted")
            _check_ttls(values.get("cache_ttl_seconds", tenant.cache_ttl_seconds),
                        values.get("cache_max_ttl_seconds", tenant.cache_max_ttl_seconds))
            if "plan" in fields:
                values["plan_id"] = (await self._plan_row(conn, fields["plan"])).id
            await _check_reservations(conn, tenant_id, values, capacity)
            if values:
                try:
                    await conn.execute(update(Tenant).where(Tenant.id == tenant_id)
                                       .values(values))
                except IntegrityError as exc:
                    raise Conflict(f"a tenant named {values.get('name')!r} exists") from exc
            result = await self._tenant_dict(conn, tenant_id)
        self._keys.invalidate()  # principals carry tenant limits: refresh them now
        return result

    async def delete_tenant(self, tenant_id: int) -> None:
        """Soft delete: usage stays for billing, keys are revoked, the name stays taken, its
        explicit caches are deleted (their storage is billed no further)."""
        async with self._begin() as conn:
            await self._tenant_row(conn, tenant_id)
            now = utcnow()
            await conn.execute(update(Tenant).where(Tenant.id == tenant_id)
                               .values(status="deleted"))
            await conn.execute(update(ApiKey).where(ApiKey.tenant_id == tenant_id,
                                                    ApiKey.revoked_at.is_(None))
                               .values(revoked_at=now))
            await conn.execute(update(ExplicitCacheRow).where(
                ExplicitCacheRow.tenant_id == tenant_id, ExplicitCacheRow.deleted_at.is_(None))
                .values(deleted_at=now))
        self._keys.invalidate()

    def _capacity_lock(self, values: dict[str, Any], capacity: dict[str, Any] | None
                       ) -> contextlib.AbstractAsyncContextManager[Any]:
        """This process's checks of shared capacity (reservations, explicit caches' budget),
        one at a time (``_exclusive`` orders them across processes)."""
        if not _bounded(values, capacity):
            return contextlib.nullcontext()
        return self._capacity

    async def _tenant_row(self, conn: AsyncConnection, tenant_id: int) -> Any:
        row = (await conn.execute(select(Tenant).where(Tenant.id == tenant_id))).one_or_none()
        if row is None:
            raise NotFound(f"tenant {tenant_id} does not exist")
        return row

    async def _tenant_dict(self, conn: AsyncConnection, tenant_id: int) -> dict[str, Any]:
        row = (await conn.execute(select(Tenant, Plan.name.label("plan"))
                                  .join(Plan, Tenant.plan_id == Plan.id)
                                  .where(Tenant.id == tenant_id))).one_or_none()
        if row is None:
            raise NotFound(f"tenant {tenant_id} does not exist")
        return _tenant_dict(row, row.plan)

    # -- plans ------------------------------------------------------------------------

    async def list_plans(self) -> list[dict[str, Any]]:
        async with self._connect() as conn:
            return [_plan_dict(r) for r in await conn.execute(select(Plan).order_by(Plan.id))]

    async def create_plan(self, name: str, input: int, cache_read: int | None = None,
                          cache_write_5m: int | None = None, cache_write_1h: int | None = None,
                          output: int | None = None, currency: str = DEFAULT_CURRENCY,
                          cache_write_24h: int | None = None,
                          cache_reservation: int | None = None,
                          cache_storage: int | None = None,
                          scheduling_weight: int | None = None) -> dict[str, Any]:
        """Prices in micro-units of ``currency`` (ISO 4217) per million tokens (the
        reservation price per GiB-hour, the storage price per million token-hours);
        omitted prices derive from ``input``. ``scheduling_weight``: the plan's tenants'
        share of the engine relative to weight 1 (1 to 1000, default 1)."""
        name = _check_name(name)
        currency = _check_currency(currency)
        weight = 1 if scheduling_weight is None else _check_range(
            "scheduling_weight", scheduling_weight, *SCHEDULING_WEIGHT_RANGE)
        prices = Prices.derived(input, cache_read, cache_write_5m, cache_write_1h, output,
                                cache_write_24h, cache_reservation, cache_storage)
        async with self._begin() as conn:
            try:
                await conn.execute(insert(Plan).values(
                    name=name, currency=currency, created_at=utcnow(), scheduling_weight=weight,
                    **{f"{k}_price": v for k, v in dataclasses.asdict(prices).items()}))
            except IntegrityError as exc:
                raise Conflict(f"a plan named {name!r} already exists") from exc
            return _plan_dict(await self._plan_row(conn, name))

    async def update_plan(self, name_or_id: str | int, scheduling_weight: int | None = None,
                          **prices: int) -> dict[str, Any]:
        """Change some prices (and the scheduling weight); events already recorded keep the
        cost they were billed.

        The currency is not among them: it is fixed when the plan is created, since reports
        state every past cost of the plan's tenants in it (make a new plan instead)."""
        if "currency" in prices:
            raise InvalidInput("a plan's currency is fixed when it is created; create a new "
                               "plan in the other currency and move tenants to it")
        unknown = set(prices) - set(_PRICE_FIELDS)
        if unknown:
            raise InvalidInput(f"unknown prices {sorted(unknown)}; allowed: {_PRICE_FIELDS}")
        weight = {} if scheduling_weight is None else {"scheduling_weight": _check_range(
            "scheduling_weight", scheduling_weight, *SCHEDULING_WEIGHT_RANGE)}
        async with self._begin() as conn:
            row = await self._plan_row(conn, name_or_id)
            merged = {k: prices.get(k, getattr(row, f"{k}_price")) for k in _PRICE_FIELDS}
            Prices(**merged).validate()
            await conn.execute(update(Plan).where(Plan.id == row.id).values(
                **{f"{k}_price": v for k, v in merged.items()}, **weight))
            result = _plan_dict(await self._plan_row(conn, row.id))
        if weight:
            self._keys.invalidate()  # principals carry the plan's weight: refresh them now
        return result

    async def _plan_row(self, conn: AsyncConnection, name_or_id: str | int) -> Any:
        plan_id = _as_id(name_or_id)
        cond = Plan.id == plan_id if plan_id is not None else Plan.name == str(name_or_id)
        row = (await conn.execute(select(Plan).where(cond))).one_or_none()
        if row is None:
            raise NotFound(f"plan {name_or_id!r} does not exist")
        return row


def _bounded(values: dict[str, Any], capacity: dict[str, Any] | None) -> bool:
    """Whether a write claims capacity that a bound checks: a reservation (or a cache
    budget) set to a number, with a capacity to check it against."""
    return bool(capacity) and any(values.get(k) is not None for k in capacity or {})


async def _exclusive(conn: AsyncConnection, values: dict[str, Any],
                     capacity: dict[str, Any] | None) -> None:
    """Serialise the transactions that check a capacity and then claim it, across every
    process on the ledger: two concurrent claims must not both read the old total. On
    PostgreSQL a transaction-scoped advisory lock; on SQLite the write lock, taken by a
    write that changes nothing, as the transaction's first statement (so no snapshot it
    reads is older than the last claim's commit)."""
    if not _bounded(values, capacity):
        return
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CAPACITY_LOCK})
    else:
        await conn.execute(text("UPDATE tenants SET id = id WHERE 0 = 1"))


_CAPACITY_LOCK = 0x6B766761  # the advisory lock id of capacity checks ("kvga")


async def _check_reservations(conn: AsyncConnection, tenant_id: int | None,
                              values: dict[str, Any], capacity: dict[str, int] | None) -> None:
    """Refuse a reservation the tier cannot hold beside the other tenants' (Conflict, with
    what is left)."""
    for field in RESERVATION_FIELDS:
        wanted = values.get(field)
        if not wanted or capacity is None or field not in capacity:
            continue
        column = getattr(Tenant, field)
        stmt = select(func.coalesce(func.sum(column), 0)).where(Tenant.status != "deleted")
        if tenant_id is not None:
            stmt = stmt.where(Tenant.id != tenant_id)
        others = int((await conn.execute(stmt)).scalar_one())
        left = max(0, capacity[field] - others)
        if wanted > left:
            tier = field.removeprefix("cache_reserved_").removesuffix("_bytes")
            raise Conflict(f"{field} {wanted} exceeds what the {tier} tier can still reserve: "
                           f"{left} of {capacity[field]} bytes are left ({others} are reserved "
                           "by other tenants)")


async def _budget_spend(conn: AsyncConnection, tenant_id: int, currency: str,
                        now: datetime) -> dict[int | None, tuple[int, int]]:
    """Per key: (this UTC day's, this UTC month's) billed micro-units in ``currency``."""
    u = UsageRow
    today = (u.started_at >= period_start("daily", now)) & (
        u.started_at < period_end("daily", now))
    rows = await conn.execute(
        select(u.key_id, func.sum(case((today, u.cost_micros), else_=0)),
               func.sum(u.cost_micros))
        .where(u.tenant_id == tenant_id, u.started_at >= period_start("monthly", now),
               u.started_at < period_end("monthly", now), u.currency == currency)
        .group_by(u.key_id))
    return {key_id: (int(d or 0), int(m or 0)) for key_id, d, m in rows}


async def _live_cache_tokens(conn: AsyncConnection, tenant_id: int | None,
                             now: datetime) -> int:
    """Tokens of the live explicit caches of a tenant (None: of every tenant)."""
    c = ExplicitCacheRow
    stmt = select(func.coalesce(func.sum(c.tokens), 0)).where(
        c.deleted_at.is_(None), c.expires_at > now)
    if tenant_id is not None:
        stmt = stmt.where(c.tenant_id == tenant_id)
    return int((await conn.execute(stmt)).scalar_one())


async def _cache_row(conn: AsyncConnection, cache_id: str, tenant_id: int,
                     now: datetime) -> Any:
    c = ExplicitCacheRow
    if not isinstance(cache_id, str) or not 0 < len(cache_id) <= 64:
        raise NotFound("no such cache")
    row = (await conn.execute(select(c).where(
        c.id == cache_id, c.tenant_id == tenant_id, c.deleted_at.is_(None),
        c.expires_at > now))).one_or_none()
    if row is None:
        raise NotFound("no such cache")
    return row


def _cache_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "tenant_id": row.tenant_id, "display_name": row.display_name,
            "model": row.model, "prefix": json.loads(row.prefix), "tokens": row.tokens,
            "created_at": row.created_at, "expires_at": row.expires_at,
            "deleted_at": row.deleted_at}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        raise InvalidInput("name must be a non-empty string of at most 128 characters")
    return name.strip()


def _check_limits(values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if key == "min_priority":
            _check_range(key, value, *PRIORITY_RANGE)
            continue
        if key == "max_running_sequences":  # 0 would run nothing: null is "no cap"
            _check_range(key, value, 1, _MAX_ID, "or null (no cap)")
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInput(f"{key} must be a non-negative integer or null, got {value!r}")
        if key in RESERVATION_FIELDS and value > MAX_RESERVATION:  # sums must stay exact
            raise InvalidInput(f"{key} must be at most {MAX_RESERVATION} bytes (1 PiB)")
        if key in BUDGET_FIELDS and value > MAX_BUDGET:
            raise InvalidInput(f"{key} must be at most {MAX_BUDGET} micro-units")


def _check_key_budgets(budgets: dict[str, Any], role: str) -> None:
    unknown = set(budgets) - set(BUDGET_FIELDS)
    if unknown:
        raise InvalidInput(f"cannot set {sorted(unknown)} on a key; allowed: "
                           f"{sorted(BUDGET_FIELDS)}")
    _check_limits(budgets)
    if role != "tenant" and any(v is not None for v in budgets.values()):
        raise InvalidInput("only tenant keys have budgets (admin keys spend nothing)")


def _key_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "prefix": r.prefix, "tenant_id": r.tenant_id, "role": r.role,
            "created_at": r.created_at.isoformat(),
            "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
            "budget_daily_micros": r.budget_daily_micros,
            "budget_monthly_micros": r.budget_monthly_micros}


def _check_range(key: str, value: Any, lo: int, hi: int, extra: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidInput(f"{key} must be an integer from {lo} to {hi}{' ' + extra if extra else ''}"
                           f", got {value!r}")
    return value


def _check_ttls(ttl: int, top: int) -> None:
    if ttl > top:
        raise InvalidInput(f"cache_ttl_seconds ({ttl}) must not exceed cache_max_ttl_seconds "
                           f"({top}): the default TTL is one a request may ask for")


def _tenant_dict(row: Any, plan: str) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "status": row.status, "plan": plan,
            "cache_ttl_seconds": row.cache_ttl_seconds,
            "cache_quota_bytes": row.cache_quota_bytes,
            "cache_reserved_device_bytes": row.cache_reserved_device_bytes,
            "cache_reserved_host_bytes": row.cache_reserved_host_bytes,
            "cache_max_ttl_seconds": row.cache_max_ttl_seconds,
            "requests_per_minute": row.requests_per_minute,
            "tokens_per_minute": row.tokens_per_minute, "max_concurrent": row.max_concurrent,
            "budget_daily_micros": row.budget_daily_micros,
            "budget_monthly_micros": row.budget_monthly_micros,
            "min_priority": row.min_priority,
            "max_running_sequences": row.max_running_sequences,
            "created_at": row.created_at.isoformat()}


def _check_currency(code: Any) -> str:
    """An ISO 4217 code: three letters, kept upper-case (``usd`` is ``USD``)."""
    if not isinstance(code, str) or not re.fullmatch(r"[A-Za-z]{3}", code.strip()):
        raise InvalidInput(f"currency must be an ISO 4217 code such as USD or EUR, got {code!r}")
    return code.strip().upper()


def _plan_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name,
            **{k: getattr(row, f"{k}_price") for k in _PRICE_FIELDS},
            "currency": row.currency, "scheduling_weight": row.scheduling_weight,
            "created_at": row.created_at.isoformat()}



def _as_id(name_or_id: str | int) -> int | None:
    """An id, or None for a name: only ASCII digits are an id (``²`` or ``١`` are names,
    which match nothing); an id past the columns' range is one that does not exist (0)."""
    if isinstance(name_or_id, int):
        return name_or_id if 0 <= name_or_id <= _MAX_ID else 0
    if name_or_id.isascii() and name_or_id.isdigit():
        value = int(name_or_id)
        return value if value <= _MAX_ID else 0
    return None
