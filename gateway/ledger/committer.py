"""Group commit: many concurrent ``record`` calls, one transaction, each caller answered
only after COMMIT.

One background task owns the write path. While it commits one batch, new events queue;
the next batch takes everything queued (up to ``max_batch``). There is no timer: under
light load a lone event commits at once, under heavy load batches grow by themselves, so
the wait is never more than one commit's time and the fsync is shared by the batch.

On a SQLite file the whole transaction (price lookup, inserts, COMMIT) runs as one call
on a writer thread that owns its own ``sqlite3`` connection: one thread hop per batch
instead of one per statement through the async driver, which under a busy engine thread
cost a GIL hand-off each. PostgreSQL goes through SQLAlchemy and asyncpg (no threads).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .billing import Prices, UsageEvent, cost_micros
from .errors import LedgerError, NotFound
from .models import Plan, Tenant, UsageRow

log = logging.getLogger("kvgate.ledger")

OnCommit = Callable[[float, int], None]
_RETRY_DELAYS_S = (0.05, 0.25, 1.0)  # safe to retry: the insert is idempotent by request id

_Item = tuple[UsageEvent, "asyncio.Future[bool]"]


class GroupCommitter:
    def __init__(self, engine: AsyncEngine, *, max_batch: int = 2000,
                 on_commit: OnCommit | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.pending = 0  # events submitted and not yet answered
        self.commits = 0
        self.events_committed = 0
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        dialect = engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        path = engine.url.database if dialect == "sqlite" else None
        self._writer = _SqliteWriter(path) if path and path != ":memory:" else None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-commit")

    async def submit(self, event: UsageEvent) -> bool:
        if self._closed:
            raise LedgerError("ledger is closed")
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending += 1
        self._queue.put_nowait((event, fut))
        # A caller that gives up (client gone) must not un-bill the request: the event
        # stays queued and commits; shield keeps the future alive for the committer.
        return await asyncio.shield(fut)

    async def close(self) -> None:
        """Commit everything already submitted, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._writer.close)

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                await self._commit_batch(batch)
            except Exception as exc:  # never leave a caller waiting forever
                log.exception("usage batch failed")
                self._answer(batch, error=LedgerError(f"could not record usage: {exc}"))

    async def _commit_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        for attempt, delay in enumerate((*_RETRY_DELAYS_S, None)):
            try:
                results = await self._write([event for event, _ in batch])
                break
            except IntegrityError:
                if len(batch) == 1:
                    raise
                # One bad event (say an unknown key id) must not fail its neighbours.
                for item in batch:
                    try:
                        await self._commit_batch([item])
                    except Exception as exc:
                        self._answer([item], error=LedgerError(f"could not record usage: {exc}"))
                return
            except (DBAPIError, OSError, sqlite3.OperationalError) as exc:
                if delay is None:
                    raise
                log.warning("usage commit failed (attempt %d), retrying: %s", attempt + 1, exc)
                await asyncio.sleep(delay)
        seconds = time.perf_counter() - start
        self.commits += 1
        self.events_committed += sum(1 for r in results if r is True)
        self._answer(batch, results=results)
        if self.on_commit is not None:
            try:
                self.on_commit(seconds, len(batch))
            except Exception:
                log.exception("on_commit callback failed")

    def _answer(self, batch: list[_Item], *, results: list[Any] | None = None,
                error: Exception | None = None) -> None:
        for i, (_, fut) in enumerate(batch):
            self.pending -= 1
            if fut.done():
                continue
            outcome = error if results is None else results[i]
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(bool(outcome))

    async def _write(self, events: list[UsageEvent]) -> list[bool | Exception]:
        if self._writer is not None:
            return await self._writer.write(events)
        return await self._write_sqlalchemy(events)

    async def _write_sqlalchemy(self, events: list[UsageEvent]) -> list[bool | Exception]:
        """One transaction: price lookup, one multi-row idempotent insert, COMMIT."""
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                select(Tenant.id, Plan.input_price, Plan.cache_read_price,
                       Plan.cache_write_5m_price, Plan.cache_write_1h_price,
                       Plan.output_price)
                .join(Plan, Tenant.plan_id == Plan.id)
                .where(Tenant.id.in_({e.tenant_id for e in events})))
            out, todo = _prepare(events, {r[0]: Prices(*r[1:]) for r in rows})
            if todo:
                stmt = (self._insert(UsageRow.__table__)
                        .on_conflict_do_nothing(index_elements=["request_id"])
                        .returning(UsageRow.__table__.c.request_id))
                inserted = set((await conn.execute(stmt, [row for _, row in todo]))
                               .scalars().all())
                for i, row in todo:
                    out[i] = row["request_id"] in inserted
        return out


def _prepare(events: list[UsageEvent], prices: dict[int, Prices]
             ) -> tuple[list[bool | Exception], list[tuple[int, dict[str, Any]]]]:
    """Per event, the answer so far: True (inserted now) is filled in by the insert; False
    (request id already billed, in the database or earlier in this batch) or that event's
    own error stand. And the rows to insert, each with its event's index."""
    out: list[bool | Exception] = []
    todo: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    for i, e in enumerate(events):
        if e.tenant_id not in prices:
            out.append(NotFound(f"tenant {e.tenant_id} does not exist"))
            continue
        out.append(False)
        if e.request_id not in seen:
            seen.add(e.request_id)
            todo.append((i, _row(e, cost_micros(e, prices[e.tenant_id]))))
    return out, todo


class _SqliteWriter:
    """The SQLite write path: one thread, one connection, one call per batch."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def write(self, events: list[UsageEvent]) -> list[bool | Exception]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._write, events)

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None)  # explicit BEGIN/COMMIT
            for pragma in db.SQLITE_PRAGMAS:
                conn.execute(pragma)
            self._conn = conn
        return self._conn

    def _write(self, events: list[UsageEvent]) -> list[bool | Exception]:
        """Runs on the writer thread: True (inserted), False (request id billed before, in
        the ledger or earlier in this batch) or that event's own error, per event."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            tenant_ids = sorted({e.tenant_id for e in events})
            rows = conn.execute(_SQLITE_PRICES.format(", ".join("?" * len(tenant_ids))),
                                tenant_ids).fetchall()
            out, todo = _prepare(events, {r[0]: Prices(*r[1:]) for r in rows})
            for i, row in todo:
                try:  # a failed statement rolls back alone; its neighbours stay
                    cur = conn.execute(_SQLITE_INSERT, [_sqlite_param(row[c]) for c in _COLUMNS])
                except sqlite3.IntegrityError as exc:
                    out[i] = LedgerError(f"could not record usage: {exc}")
                    continue
                out[i] = cur.rowcount == 1
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out


_COLUMNS = ("request_id", "tenant_id", "key_id", "model", "endpoint", "prompt_tokens",
            "cached_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
            "completion_tokens", "cost_micros", "status", "started_at", "finished_at",
            "ttft_ms")
_SQLITE_INSERT = (f"INSERT INTO usage_events ({', '.join(_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(_COLUMNS))}) "
                  "ON CONFLICT (request_id) DO NOTHING")


_SQLITE_PRICES = ("SELECT t.id, p.input_price, p.cache_read_price, p.cache_write_5m_price, "
                  "p.cache_write_1h_price, p.output_price FROM tenants t "
                  "JOIN plans p ON t.plan_id = p.id WHERE t.id IN ({})")


def _sqlite_param(value: Any) -> Any:
    """Times as ``UTCDateTime`` stores them on SQLite: naive UTC text, microseconds."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(
            sep=" ", timespec="microseconds")
    return value


def _row(e: UsageEvent, cost: int) -> dict[str, Any]:
    return {
        "request_id": e.request_id, "tenant_id": e.tenant_id, "key_id": e.key_id,
        "model": e.model, "endpoint": e.endpoint, "prompt_tokens": e.prompt_tokens,
        "cached_tokens": e.cached_tokens, "cache_write_5m_tokens": e.cache_write_5m_tokens,
        "cache_write_1h_tokens": e.cache_write_1h_tokens,
        "completion_tokens": e.completion_tokens, "cost_micros": cost, "status": e.status,
        "started_at": e.started_at, "finished_at": e.finished_at, "ttft_ms": e.ttft_ms,
    }
