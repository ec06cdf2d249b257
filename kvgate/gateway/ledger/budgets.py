"""Spend budgets: a tenant's and an API key's, per UTC day and per UTC month, in integer
micro-units of the tenant's plan currency (``None``: no budget).

``Budgets`` is one replica's view, per tenant: **spent** (one aggregate query,
``Ledger.budget_spend``, read again once ``refresh_s`` old, plus what this replica billed
since it began: ``Hold.settle``) and **reserved** (the worst cases of admitted requests not
yet settled). ``reserve`` checks every budget that applies and reserves, with no await in
between; ``Hold.settle`` swaps the reservation for the billed cost, ``release`` drops it.
With the database away the last figure read answers for ``stale_s``, then a budgeted
request gets ``LedgerUnavailable``. What counts as spend, and how far replicas together
may overshoot: docs/architecture.md, "Spend budgets".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Protocol

from kvgate.gateway.usage import Usage

from .auth import Principal
from .billing import Billed, PlanPrices, cost_micros
from .errors import LedgerUnavailable


class SpendLedger(Protocol):
    """What of the ``Ledger`` budgets read."""

    def plan_prices(self, tenant_id: int) -> PlanPrices | None: ...

    async def budget_spend(self, tenant_id: int, currency: str, now: datetime
                           ) -> dict[int | None, tuple[int, int]]: ...

    def spool_depth(self) -> int: ...

log = logging.getLogger("kvgate.ledger")

PERIODS = ("daily", "monthly")
REFRESH_S = 2.0  # a tenant's spend is read again from the ledger once this old
STALE_S = 60.0  # with the database away, the last figure answers for this long
MAX_BUDGET = 2**53 - 1  # exact in every JSON reader (the console's JavaScript too)


def period_start(period: str, now: datetime) -> datetime:
    """The start of the UTC day or month ``now`` falls in."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "daily" else day.replace(day=1)


def period_end(period: str, now: datetime) -> datetime:
    """When the period ``now`` falls in ends (its budget resets): the next UTC midnight, or
    the first of the next month at 00:00 UTC."""
    start = period_start(period, now)
    if period == "daily":
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)


def iso_z(when: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``: what messages and JSON show."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _period_key(period: str, when: datetime) -> date:
    return period_start(period, when).date()


class BudgetExceeded(Exception):
    """A request whose worst case would take a budget past its limit. ``scope``: tenant or
    key; ``period``: daily or monthly; ``never``: the worst case alone exceeds the (non-zero)
    budget, so no wait admits it."""

    def __init__(self, scope: str, period: str, budget: int, spent: int, reserved: int,
                 cost: int, currency: str, resets_at: datetime, now: datetime) -> None:
        self.scope, self.period, self.budget, self.currency = scope, period, budget, currency
        self.spent, self.reserved, self.cost = spent, reserved, cost
        self.resets_at = resets_at
        self.retry_after_s = max(1.0, (resets_at - now).total_seconds())
        self.never = cost > budget > 0  # a budget of 0 is spent, not one to fit in
        whose = "this tenant's" if scope == "tenant" else "this API key's"
        head = f"{whose} {period} budget is {budget} micro-{currency}"
        if self.never:
            message = (f"This request may cost up to {cost} micro-{currency}, more than "
                       f"{whose} whole {period} budget of {budget}; lower max_tokens (or "
                       "n, or the prompt) to fit it.")
        else:
            held = f" and {reserved} are held by requests in flight" if reserved else ""
            message = (f"Budget exceeded: {head}; {spent} are spent{held}, and this "
                       f"request may cost up to {cost}. The budget resets at "
                       f"{iso_z(resets_at)}.")
        super().__init__(message)


@dataclass
class _Charge:
    seq: int
    key_id: int
    day: date
    month: date
    cost: int


@dataclass
class _TenantSpend:
    """One tenant's figures on this replica."""

    currency: str | None = None
    day: date | None = None  # the periods ``base`` is for
    month: date | None = None
    base: dict[int | None, tuple[int, int]] = field(default_factory=dict)  # key: (day, month)
    read_at: float | None = None  # clock() when the query for ``base`` began
    recent: list[_Charge] = field(default_factory=list)  # billed here since that query
    spooled: list[_Charge] = field(default_factory=list)  # billed into the spool here
    reserved: int = 0
    reserved_by_key: dict[int, int] = field(default_factory=dict)
    reading: asyncio.Future[None] | None = None  # the query under way, shared

    def spent(self, period: str, now: datetime, key_id: int | None = None,
              tenant: bool = True) -> int:
        """Spend of the tenant (``tenant``) or of key ``key_id`` in the period of ``now``."""
        when = _period_key(period, now)
        index = 0 if period == "daily" else 1
        total = 0
        if (self.day if period == "daily" else self.month) == when:
            total += sum(v[index] for k, v in self.base.items() if tenant or k == key_id)
        for c in (*self.recent, *self.spooled):
            if (tenant or c.key_id == key_id) and (c.day if index == 0 else c.month) == when:
                total += c.cost
        return total


class Hold:
    """One request's reservation: ``settle`` at finish with what the ledger billed, or
    ``release`` when nothing was billed. Both are idempotent, and only the first counts."""

    def __init__(self, budgets: Budgets | None = None, tenant_id: int = 0,
                 key_id: int = 0, cost: int = 0,
                 started_at: datetime | None = None) -> None:
        self._budgets = budgets
        self.tenant_id, self.key_id, self.cost = tenant_id, key_id, cost
        self.started_at = started_at
        self._open = budgets is not None

    def settle(self, billed: Billed) -> None:
        if self._open:
            self._open = False
            assert self._budgets is not None
            self._budgets._settle(self, billed)

    def release(self) -> None:
        if self._open:
            self._open = False
            assert self._budgets is not None
            self._budgets._settle(self, None)


NO_HOLD = Hold()  # what a principal without budgets holds: nothing


class Budgets:
    def __init__(self, ledger: SpendLedger, *, refresh_s: float = REFRESH_S,
                 stale_s: float = STALE_S, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.ledger = ledger
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self.clock, self.now = clock, now
        # Called as (tenant_id, period, remaining micro-units) after every change of a
        # tenant's figures for a budget it has, (tenant_id, period, None) once it has none
        # (the metrics gauge)
        self.observer: Callable[[int, str, int | None], None] | None = None
        self._tenants: dict[int, _TenantSpend] = {}
        self._budgets: dict[int, dict[str, int]] = {}  # tenant -> period -> its budget
        self._seq = 0

    async def reserve(self, principal: Principal, worst_cases: Iterable[Usage],
                      started_at: datetime | None = None) -> Hold:
        """Reserve the most the request can cost (the dearest of ``worst_cases``, priced by
        the tenant's plan) or raise ``BudgetExceeded``; ``LedgerUnavailable`` when its
        spend cannot be known (database away for more than ``stale_s``)."""
        tid = principal.tenant_id
        if not principal.has_budget or tid is None:
            return NO_HOLD
        plan = self.ledger.plan_prices(tid)
        if plan is None:  # read with the key (``_load_principal``): not seen yet
            raise LedgerUnavailable(f"the prices of tenant {tid} are not known yet")
        cost = max(cost_micros(u, plan.prices) for u in worst_cases)
        entry = self._tenants.setdefault(tid, _TenantSpend())
        now = self.now()
        await self._fresh(tid, entry, plan.currency, now)
        now = self.now()
        key = principal.key_id
        limits = (("tenant", "daily", principal.budget_daily_micros),
                  ("tenant", "monthly", principal.budget_monthly_micros),
                  ("key", "daily", principal.key_budget_daily_micros),
                  ("key", "monthly", principal.key_budget_monthly_micros))
        over: list[BudgetExceeded] = []
        for scope, period, budget in limits:
            if budget is None:
                continue
            tenant = scope == "tenant"
            spent = entry.spent(period, now, key, tenant=tenant)
            reserved = entry.reserved if tenant else entry.reserved_by_key.get(key, 0)
            if spent + reserved + cost > budget:
                over.append(BudgetExceeded(scope, period, budget, spent, reserved, cost,
                                           plan.currency, period_end(period, now), now))
        if over:  # the one a wait cures last: a request over several waits for all
            raise max(over, key=lambda e: (e.never, e.resets_at))
        entry.reserved += cost
        entry.reserved_by_key[key] = entry.reserved_by_key.get(key, 0) + cost
        self._budgets[tid] = {p: b for p, b in zip(
            PERIODS, (principal.budget_daily_micros, principal.budget_monthly_micros),
            strict=True) if b is not None}
        self._observe(tid, entry, now)
        return Hold(self, tid, key, cost, started_at or now)

    def _settle(self, hold: Hold, billed: Billed | None) -> None:
        entry = self._tenants.get(hold.tenant_id)
        if entry is None:
            return
        entry.reserved -= hold.cost
        left = entry.reserved_by_key.pop(hold.key_id, 0) - hold.cost
        if left > 0:
            entry.reserved_by_key[hold.key_id] = left
        if (billed is not None and billed.new and billed.cost_micros
                and billed.currency == entry.currency):
            self._seq += 1
            when = hold.started_at or self.now()
            charge = _Charge(self._seq, hold.key_id, _period_key("daily", when),
                             _period_key("monthly", when), billed.cost_micros)
            (entry.spooled if billed.spooled else entry.recent).append(charge)
        self._observe(hold.tenant_id, entry, self.now())

    async def _fresh(self, tid: int, entry: _TenantSpend, currency: str,
                     now: datetime) -> None:
        """Read the tenant's spend again when it is ``refresh_s`` old, of other periods or
        another currency; concurrent requests share one query. With the database away a
        figure up to ``stale_s`` old still answers."""
        age = None if entry.read_at is None else self.clock() - entry.read_at
        current = (entry.currency == currency and entry.day == _period_key("daily", now)
                   and entry.month == _period_key("monthly", now))
        if current and age is not None and age < self.refresh_s:
            return
        try:
            if entry.reading is None:
                reading = entry.reading = asyncio.ensure_future(
                    self._read(tid, entry, currency, now))
                reading.add_done_callback(lambda f: self._read_done(entry, f))
            await asyncio.shield(entry.reading)
        except LedgerUnavailable as exc:
            age = None if entry.read_at is None else self.clock() - entry.read_at
            if age is None or age > self.stale_s or entry.currency != currency:
                raise
            log.warning("tenant %s: budget checked against its spend as read %.0f s ago "
                        "(the ledger database is unavailable: %s)", tid, age, exc)

    async def _read(self, tid: int, entry: _TenantSpend, currency: str,
                    now: datetime) -> None:
        seq, began = self._seq, self.clock()
        # Spooled charges are in the database once the spool is empty: read after that,
        # the query sees them (while it is not, they may be counted twice: never less).
        drained = self.ledger.spool_depth() == 0
        base = await self.ledger.budget_spend(tid, currency, now)
        entry.base, entry.currency, entry.read_at = base, currency, began
        entry.day, entry.month = _period_key("daily", now), _period_key("monthly", now)
        # Charges billed before the query began are committed, so it counted them.
        entry.recent = [c for c in entry.recent if c.seq > seq]
        entry.spooled = [c for c in entry.spooled if c.seq > seq or not drained]

    @staticmethod
    def _read_done(entry: _TenantSpend, reading: asyncio.Future[None]) -> None:
        if entry.reading is reading:
            entry.reading = None
        if not reading.cancelled():
            reading.exception()  # retrieved: its waiters may all have gone

    def _observe(self, tid: int, entry: _TenantSpend, now: datetime) -> None:
        if self.observer is None:
            return
        for period, budget in self._budgets.get(tid, {}).items():
            self.observer(tid, period, budget - entry.spent(period, now) - entry.reserved)

    def budgets_changed(self, tenant_id: int, daily: int | None, monthly: int | None) -> None:
        """A tenant's budgets were set (or the tenant deleted: both None) on this replica:
        what the observer reports follows at once."""
        budgets = {p: b for p, b in zip(PERIODS, (daily, monthly), strict=True)
                   if b is not None}
        old = self._budgets.pop(tenant_id, {})
        if budgets:
            self._budgets[tenant_id] = budgets
        if self.observer is None:
            return
        for period in old.keys() - budgets.keys():
            self.observer(tenant_id, period, None)
        entry = self._tenants.get(tenant_id)
        if entry is not None and entry.read_at is not None:
            self._observe(tenant_id, entry, self.now())
