"""Group commit: concurrent ``record`` calls share one transaction; each caller is answered
only after COMMIT.

One background task owns the write path; each batch takes everything queued (up to
``max_batch``). On a SQLite file the transaction runs as one call on a writer thread with
its own ``sqlite3`` connection; PostgreSQL goes through SQLAlchemy and asyncpg. A batch the
database cannot take goes to the spool (``spool.py``) and is committed later by ``replay``
(the same insert, idempotent by request id). A batch the spool cannot take either is
``held`` in memory (at most ``max_held``) until the spool or the database takes it; the
spool is re-tested every ``retest_s`` and on ``kick_retest``. Why: docs/architecture.md,
"Ledger".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import db
from .billing import Billed, PlanPrices, Prices, UsageEvent, cost_micros
from .db import SqliteFile
from .errors import LedgerError, LedgerUnavailable, NotFound
from .models import Plan, ReceiptRow, Tenant, UsageRow, utcnow
from .receipts import ReceiptKey
from .receipts import payload as receipt_payload
from .spool import Spool, SpoolRecord

log = logging.getLogger("kvgate.ledger")

OnCommit = Callable[[float, int], None]
_RETRY_DELAYS_S = (0.05, 0.25, 1.0)  # safe to retry: the insert is idempotent by request id
_REPLAY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # between replay attempts; the last repeats
RETEST_S = 2.0  # a failing spool is probed this often (admission resumes within that)
_KICK_GAP_S = 0.25  # a refused request re-tests the spool at most this often
DEFAULT_MAX_HELD = 10_000  # answered events held in memory while the spool fails
# What says the database cannot take a write now (rather than that one event is wrong).
_UNAVAILABLE = (DBAPIError, OSError, sqlite3.OperationalError, asyncio.TimeoutError,
                LedgerUnavailable)

_Item = tuple[UsageEvent, "asyncio.Future[Billed]"]
# Per event of a batch: the answer, or that event's own error.
_Outcome = Billed | Exception


class SpoolTrouble(LedgerError):
    """Replay committed what it could but the spool file could not be read or cut: the
    database is fine; replay is retried (what is committed twice is billed once)."""


class GroupCommitter:
    def __init__(self, engine: AsyncEngine, *, max_batch: int = 2000,
                 on_commit: OnCommit | None = None, spool: Spool | None = None,
                 sqlite_file: SqliteFile | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.spool = spool
        self.sqlite_file = sqlite_file
        self.pending = 0  # events submitted and not yet answered
        self.commits = 0
        self.events_committed = 0
        self.replayed = 0  # spooled events committed by replay (new rows)
        self.unavailable: str | None = None  # why the last write failed, until one succeeds
        self.plans: dict[int, PlanPrices] = {}  # tenant id -> the prices last read for it
        # Signs the receipt stored with each event that names one (None: none stored)
        self.receipt_key: ReceiptKey | None = None
        # Answered events neither the spool nor the database took yet (oldest first)
        self.held: deque[SpoolRecord] = deque()
        self.max_held = DEFAULT_MAX_HELD
        self.retest_s = RETEST_S
        # The timer of the spool's re-test (a test drives its own clock through it)
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._retester: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()  # the spool failed, or a refused request asks
        self._last_retest = 0.0
        self._spool_lock = asyncio.Lock()  # one append of what is held at a time
        self._closed = False
        dialect = engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        path = engine.url.database if dialect == "sqlite" else None
        self._writer = _SqliteWriter(path) if path and path != ":memory:" else None

    def start(self, unavailable: BaseException | None = None) -> None:
        """``unavailable``: the database could not be reached at start; usage is spooled
        and the replayer probes it until it answers."""
        if unavailable is not None:  # (``Ledger.open`` has said so)
            self.unavailable = str(unavailable) or type(unavailable).__name__
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="ledger-commit")
        if self.spool is not None:
            self._replayer = loop.create_task(self._replay_loop(), name="ledger-replay")
            self._retester = loop.create_task(self._retest_loop(), name="ledger-spool-retest")
            self._wake.set()  # replay what an earlier run left

    def remember_prices(self, tenant_id: int, plan: PlanPrices) -> None:
        self.plans[tenant_id] = plan

    async def submit(self, event: UsageEvent) -> Billed:
        if self._closed:
            raise LedgerError("ledger is closed")
        fut: asyncio.Future[Billed] = asyncio.get_running_loop().create_future()
        self.pending += 1
        self._queue.put_nowait((event, fut))
        # A caller that gives up (client gone) must not un-bill the request: the event
        # stays queued and commits; shield keeps the future alive for the committer.
        return await asyncio.shield(fut)

    async def close(self) -> None:
        """Commit (or spool) everything already submitted, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        for task in (self._replayer, self._retester):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.spool is not None:
            await self._flush_held()
            await self.spool.close()
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
                if self.unavailable is not None and self.spool is not None:
                    await self._spool_batch(batch)  # the replayer says when it is back
                    continue
                await self._commit_batch(batch)
            except _UNAVAILABLE as exc:
                self._mark_unavailable(exc)
                if self.spool is None:
                    self._answer(batch, error=LedgerUnavailable(f"could not record usage: {exc}"))
                else:
                    await self._spool_batch(batch)
            except Exception as exc:  # never leave a caller waiting forever
                log.exception("usage batch failed")
                self._answer(batch, error=LedgerError(f"could not record usage: {exc}"))

    def _mark_unavailable(self, exc: BaseException) -> None:
        if self.unavailable is None:
            log.error("ledger database unavailable, spooling usage: %s", exc)
        self.unavailable = str(exc) or type(exc).__name__

    async def _spool_batch(self, batch: list[_Item]) -> None:
        """Durable in the spool (after what is held), then answered with the last known
        prices; when the spool fails, held in memory and answered alike."""
        assert self.spool is not None
        records = [SpoolRecord(event, self._price(event), self.plans.get(event.tenant_id))
                   for event, _ in batch]
        async with self._spool_lock:
            held = list(self.held)
            try:
                await self.spool.append(held + records)
            except OSError as exc:
                self._hold(batch, records, exc)
                return
            self._release(held)
        if held:
            log.warning("usage spool writable again; %d held events spooled", len(held))
        self._answer(batch, results=[_answer_of(r) for r in records])
        self._wake.set()

    def _hold(self, batch: list[_Item], records: list[SpoolRecord], exc: OSError) -> None:
        """The spool failed with the database away: keep what fits in ``held`` (answered
        as spooled), refuse the rest as before (``LedgerUnavailable``); both logged with
        the events' bytes."""
        room = max(0, self.max_held - len(self.held))
        if not self.held:
            log.error("usage spool failed with the database away; answered usage is held "
                      "in memory (at most %d events) until the spool or the database takes "
                      "it, and new requests are refused: %s", self.max_held, exc)
        for r in records[:room]:
            log.warning("usage event held in memory: %s", _line(r))
            self.held.append(r)
        for r in records[room:]:
            log.error("usage event not recorded (database and spool unavailable, %d events "
                      "held already): %s", len(self.held), _line(r))
        self._answer(batch[:room], results=[replace(_answer_of(r), held=True)
                                             for r in records[:room]])
        self._answer(batch[room:], error=LedgerUnavailable(
            f"could not record usage: database and spool unavailable: {exc}"))
        self._wake.set()  # the replayer probes the database and commits what is held
        self._kick.set()  # the re-test timer starts

    def _release(self, done: list[SpoolRecord]) -> None:
        """``done`` (a snapshot of ``held``) is in the spool or the database now."""
        if done:
            gone = {id(r) for r in done}
            self.held = deque(r for r in self.held if id(r) not in gone)

    def kick_retest(self) -> None:
        """A request was refused because the spool fails: re-test it now (or, when one
        ran less than ``_KICK_GAP_S`` ago, that much after it), not at the timer's turn."""
        self._kick.set()

    def spool_failing(self) -> bool:
        """The spool's last append or probe failed, or answered usage is held."""
        return self.spool is not None and (not self.spool.healthy or bool(self.held))

    async def retest_spool(self) -> bool:
        """Probe the spool, then move what is held into it; True once it takes writes and
        nothing is held."""
        if self.spool is None:
            return True
        self._last_retest = time.monotonic()
        async with self._spool_lock:
            held = list(self.held)
            try:
                await self.spool.probe()
                if held:
                    await self.spool.append(held)
            except OSError as exc:
                log.info("usage spool still failing: %s", exc)
                return False
            self._release(held)
        log.warning("usage spool writable again; %d held events spooled", len(held))
        self._wake.set()
        return not self.spool_failing()

    async def _retest_loop(self) -> None:
        """While the spool fails: ``retest_spool`` every ``retest_s``, or sooner when
        kicked; idle (waiting for a failure's kick) while it works."""
        while True:
            if not self.spool_failing():
                await self._kick.wait()
                self._kick.clear()
                continue
            timer = asyncio.ensure_future(self.sleep(self.retest_s))
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait((timer, kicked), return_when=asyncio.FIRST_COMPLETED)
            finally:
                timer.cancel()
                kicked.cancel()
            if self._kick.is_set():  # asked by requests: not more often than every gap
                self._kick.clear()
                gap = self._last_retest + _KICK_GAP_S - time.monotonic()
                if gap > 0:
                    await asyncio.sleep(gap)
            if self.spool_failing():
                try:
                    await self.retest_spool()
                except Exception:
                    log.exception("usage spool re-test failed")

    async def _flush_held(self) -> None:
        """At close: what is held goes to the spool (or the database), else to the log."""
        held = list(self.held)
        if not held:
            return
        assert self.spool is not None
        try:
            await self.spool.append(held)
        except OSError as exc:
            try:
                await self._commit_records(held)
            except Exception:
                for r in held:
                    log.error("usage event lost at shutdown (spool: %s): %s", exc, _line(r))
        self._release(held)

    def _price(self, event: UsageEvent) -> Billed | None:
        plan = self.plans.get(event.tenant_id)
        if plan is None:
            return None
        return Billed(new=True, cost_micros=cost_micros(event.usage, plan.prices),
                      currency=plan.currency, spooled=True)

    async def _replay_loop(self) -> None:
        assert self.spool is not None
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.spool.depth or self.unavailable is not None or self.held:
                try:
                    await self.replay()
                    failures = 0
                except SpoolTrouble as exc:
                    log.warning("%s; replay retried", exc)
                    await asyncio.sleep(_REPLAY_DELAYS_S[min(failures, len(_REPLAY_DELAYS_S) - 1)])
                    failures += 1
                except _UNAVAILABLE as exc:
                    self._mark_unavailable(exc)
                    delay = _REPLAY_DELAYS_S[min(failures, len(_REPLAY_DELAYS_S) - 1)]
                    failures += 1
                    await asyncio.sleep(delay)
                except Exception:
                    log.exception("usage spool replay failed")
                    await asyncio.sleep(_REPLAY_DELAYS_S[-1])

    async def replay(self) -> int:
        """Commit what the spool holds and what is held in memory, then drop it from the
        spool; returns the events that were new to the database. With nothing to commit,
        checks the database answers. ``SpoolTrouble`` when the spool file could not be read
        or cut (the database is up)."""
        assert self.spool is not None
        trouble: OSError | None = None
        try:
            records, end = await self.spool.read()
        except OSError as exc:
            records, end, trouble = [], 0, exc
        held = list(self.held)
        if not records and not held:
            await self.probe_database()
        new = await self._commit_records(records) + await self._commit_records(held)
        self._release(held)
        if records and trouble is None:
            try:
                await self.spool.drop(end, len(records))
            except OSError as exc:
                trouble = exc
        self.replayed += new
        if self.unavailable is not None:
            log.warning("ledger database is back; %d spooled usage events committed", new)
        self.unavailable = None
        if trouble is not None:
            raise SpoolTrouble(f"usage spool in {self.spool.directory}: {trouble}") from trouble
        return new

    async def probe_database(self) -> None:
        """Raises (one of ``_UNAVAILABLE``) unless the database answers a query."""
        if self.sqlite_file is not None:
            self.sqlite_file.check()
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")

    async def _commit_records(self, records: list[SpoolRecord]) -> int:
        """Spooled (or held) events into the database, at the cost they were answered
        with; → how many were new. An event the database refuses for itself (never for
        an outage) is logged with its bytes and dropped."""
        new = 0
        for i in range(0, len(records), self.max_batch):
            chunk = records[i:i + self.max_batch]
            try:
                results = await self._write([r.event for r in chunk], [r.billed for r in chunk],
                                            [r.plan for r in chunk])
            except IntegrityError:  # one bad event: alone, each
                results = []
                for r in chunk:
                    try:
                        results += await self._write([r.event], [r.billed], [r.plan])
                    except IntegrityError as exc:
                        results.append(exc)
            for r, outcome in zip(chunk, results, strict=True):
                if isinstance(outcome, Billed):
                    new += outcome.new
                else:  # it can never commit; keep it out of the way, say so
                    log.error("spooled usage event %s cannot be recorded, dropped: %s\n%s",
                              r.event.request_id, outcome, r.to_json())
        return new

    async def _commit_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        for attempt, delay in enumerate((*_RETRY_DELAYS_S, None)):
            try:
                results = await self._write([event for event, _ in batch], None)
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
                if delay is None or (self.spool is not None and attempt > 0):
                    raise
                log.warning("usage commit failed (attempt %d), retrying: %s", attempt + 1, exc)
                await asyncio.sleep(delay)
        seconds = time.perf_counter() - start
        self.commits += 1
        self.events_committed += sum(1 for r in results if isinstance(r, Billed) and r.new)
        self._answer(batch, results=results)
        if self.on_commit is not None:
            try:
                self.on_commit(seconds, len(batch))
            except Exception:
                log.exception("on_commit callback failed")

    def _answer(self, batch: list[_Item], *, results: list[_Outcome] | None = None,
                error: Exception | None = None) -> None:
        for i, (_, fut) in enumerate(batch):
            self.pending -= 1
            if fut.done():
                continue
            outcome = error if results is None else results[i]
            if isinstance(outcome, Billed):
                fut.set_result(outcome)
            else:
                fut.set_exception(outcome or LedgerError("no outcome for a usage event"))

    async def _write(self, events: list[UsageEvent],
                     priced: Sequence[Billed | None] | None,
                     priced_plans: Sequence[PlanPrices | None] | None = None
                     ) -> list[_Outcome]:
        """``priced``: per event, the cost it was already answered with (spooled), if any,
        and ``priced_plans`` the plan that cost was computed by."""
        if self.sqlite_file is not None:
            self.sqlite_file.check()
        known = _Known(priced, priced_plans, self.receipt_key)
        if self._writer is not None:
            out, plans = await self._writer.write(events, known)
        else:
            out, plans = await self._write_sqlalchemy(events, known)
        self.plans.update(plans)
        return out

    async def _write_sqlalchemy(self, events: list[UsageEvent], known: _Known
                                ) -> tuple[list[_Outcome], dict[int, PlanPrices]]:
        """One transaction: price lookup, one multi-row idempotent insert of the usage
        rows, one of the receipts of the rows inserted, COMMIT."""
        async with self.engine.begin() as conn:
            rows = await conn.execute(_PRICES.where(Tenant.id.in_({e.tenant_id for e in events})))
            plans = {r[0]: _plan_of(r) for r in rows}
            out, todo = _prepare(events, plans, known)
            if todo:
                stmt = (self._insert(UsageRow)
                        .on_conflict_do_nothing(index_elements=["request_id"])
                        .returning(UsageRow.request_id))
                inserted = set((await conn.execute(stmt, [row for _, row, _ in todo]))
                               .scalars().all())
                receipts = [r for _, row, r in todo
                            if r is not None and row["request_id"] in inserted]
                if receipts:
                    await conn.execute(self._insert(ReceiptRow)
                                       .on_conflict_do_nothing(index_elements=["id"]), receipts)
                for i, row, _ in todo:
                    out[i] = _billed(out[i], row["request_id"] in inserted)
        return out, plans


# The plan of tenants: prices in ``Prices`` field order, the currency, the plan's id and name.
_PRICES = (select(Tenant.id, *(getattr(Plan, f"{f.name}_price") for f in fields(Prices)),
                  Plan.currency, Plan.id, Plan.name)
           .join(Plan, Tenant.plan_id == Plan.id))


def _plan_of(row: Sequence[Any]) -> PlanPrices:
    """From a ``_PRICES`` row (its tenant id first)."""
    n = len(fields(Prices))
    return PlanPrices(Prices(*row[1 : 1 + n]), *row[1 + n : 4 + n])


@dataclass(frozen=True)
class _Known:
    """What a write knows besides its events: per event, the cost it was answered with
    from the spool and the plan behind that cost (if any), and the receipt key."""

    priced: Sequence[Billed | None] | None = None
    plans: Sequence[PlanPrices | None] | None = None
    receipt_key: ReceiptKey | None = None


# Per event to insert: its index, its usage row, its receipt row (None: no receipt)
_Todo = tuple[int, dict[str, Any], dict[str, Any] | None]


def _prepare(events: list[UsageEvent], plans: dict[int, PlanPrices],
             known: _Known | None = None) -> tuple[list[_Outcome], list[_Todo]]:
    """Per event, the answer so far: ``Billed(new=False)`` (request id already billed, in
    the database or earlier in this batch) until the insert says it is new, or that
    event's own error. And the rows to insert, each with its event's index: the usage row
    and the signed receipt, both from the one event and the one plan. An event already
    ``priced`` (answered from the spool) keeps that cost, and its receipt that plan."""
    known = known or _Known()
    out: list[_Outcome] = []
    todo: list[_Todo] = []
    seen: set[str] = set()
    for i, e in enumerate(events):
        plan = plans.get(e.tenant_id)
        if plan is None:
            out.append(NotFound(f"tenant {e.tenant_id} does not exist"))
            continue
        spooled = known.priced[i] if known.priced is not None else None
        if spooled is None:
            billed = Billed(new=False, cost_micros=cost_micros(e.usage, plan.prices),
                            currency=plan.currency)
        else:
            billed = Billed(new=False, cost_micros=spooled.cost_micros,
                            currency=spooled.currency)
            spooled_plan = known.plans[i] if known.plans is not None else None
            plan = spooled_plan or plan
        out.append(billed)
        if e.request_id not in seen:
            seen.add(e.request_id)
            todo.append((i, usage_row(e, billed), _receipt_row(e, billed, plan, known)))
    return out, todo


def _receipt_row(e: UsageEvent, billed: Billed, plan: PlanPrices, known: _Known
                 ) -> dict[str, Any] | None:
    if e.receipt_id is None or known.receipt_key is None:
        return None
    signed = known.receipt_key.sign(receipt_payload(e, billed, plan))
    return {"id": e.receipt_id, "request_id": e.request_id, "tenant_id": e.tenant_id,
            "body": json.dumps(signed, sort_keys=True, separators=(",", ":")),
            "created_at": utcnow()}


def _billed(outcome: _Outcome, inserted: bool) -> _Outcome:
    return replace(outcome, new=True) if inserted and isinstance(outcome, Billed) else outcome


class _SqliteWriter:
    """The SQLite write path: one thread, one connection, one call per batch."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def write(self, events: list[UsageEvent], known: _Known
                    ) -> tuple[list[_Outcome], dict[int, PlanPrices]]:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._write, events, known)

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

    def _write(self, events: list[UsageEvent], known: _Known
               ) -> tuple[list[_Outcome], dict[int, PlanPrices]]:
        """Runs on the writer thread: per event, ``Billed`` (``new`` False when the request
        id was billed before, in the ledger or earlier in this batch) or its own error."""
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            plans = {}
            for tenant_id in {e.tenant_id for e in events}:
                for r in conn.execute(_SQLITE_PRICES.sql, (tenant_id,)):
                    plans[r[0]] = _plan_of(r)
            out, todo = _prepare(events, plans, known)
            for i, row, receipt in todo:
                try:  # a failed statement rolls back alone; its neighbours stay
                    cur = conn.execute(_SQLITE_INSERT.sql, _SQLITE_INSERT.params(row))
                except sqlite3.IntegrityError as exc:
                    out[i] = LedgerError(f"could not record usage: {exc}")
                    continue
                if cur.rowcount == 1 and receipt is not None:
                    conn.execute(_SQLITE_RECEIPT.sql, _SQLITE_RECEIPT.params(receipt))
                out[i] = _billed(out[i], cur.rowcount == 1)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out, plans


@dataclass(frozen=True)
class _SqliteStatement:
    """A statement SQLAlchemy compiled once for the ``sqlite3`` module: its SQL text and the
    order of its positional parameters, so the writer thread spells no column itself."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def compile(cls, stmt: Any) -> _SqliteStatement:
        compiled = stmt.compile(dialect=sqlite.dialect(paramstyle="qmark"))
        return cls(str(compiled), tuple(compiled.positiontup or ()))

    def params(self, row: dict[str, Any]) -> list[Any]:
        return [_sqlite_param(row[name]) for name in self.names]


_INSERT_COLUMNS = tuple(c.name for c in UsageRow.__table__.columns if not c.primary_key)
_SQLITE_INSERT = _SqliteStatement.compile(
    sqlite.insert(UsageRow)
    .values({name: bindparam(name) for name in _INSERT_COLUMNS})
    .on_conflict_do_nothing(index_elements=["request_id"]))
_SQLITE_RECEIPT = _SqliteStatement.compile(
    sqlite.insert(ReceiptRow)
    .values({c.name: bindparam(c.name) for c in ReceiptRow.__table__.columns})
    .on_conflict_do_nothing(index_elements=["id"]))
_SQLITE_PRICES = _SqliteStatement.compile(_PRICES.where(Tenant.id == bindparam("tenant_id")))


def _sqlite_param(value: Any) -> Any:
    """Times as ``UTCDateTime`` stores them on SQLite: naive UTC text, microseconds."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(
            sep=" ", timespec="microseconds")
    return value


def _answer_of(record: SpoolRecord) -> Billed:
    """What a caller whose event is spooled (or held) is answered."""
    return record.billed or Billed(True, 0, "", spooled=True)


def _line(record: SpoolRecord) -> str:
    """An event as the log shows it: its spool record, to recover by hand."""
    return json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True)


def usage_row(e: UsageEvent, billed: Billed) -> dict[str, Any]:
    """The ``usage_events`` row of one event: the one place the record meets the table."""
    u = e.usage
    return {
        "request_id": e.request_id, "tenant_id": e.tenant_id, "key_id": e.key_id,
        "model": e.model, "endpoint": e.endpoint, "prompt_tokens": u.prompt_tokens,
        "cached_tokens": u.cached_tokens, "cache_write_5m_tokens": u.cache_write_5m_tokens,
        "cache_write_1h_tokens": u.cache_write_1h_tokens,
        "cache_write_24h_tokens": u.cache_write_24h_tokens,
        "completion_tokens": u.completion_tokens, "cost_micros": billed.cost_micros,
        "reserved_byte_seconds": u.reserved_byte_seconds,
        "stored_token_seconds": u.stored_token_seconds, "cache_key": e.cache_key,
        "currency": billed.currency, "status": e.status,
        "started_at": e.started_at, "finished_at": e.finished_at, "ttft_ms": e.ttft_ms,
    }
