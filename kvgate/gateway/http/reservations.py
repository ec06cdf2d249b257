"""Cache reservations: applied to this replica's tiers and billed per byte-hour.

A tenant's reservation (``cache_reserved_device_bytes`` / ``cache_reserved_host_bytes``) is
capacity of each tier of each replica that other tenants' traffic cannot evict
(``kvgate.cachestore.shares``). Every ``reservation_bill_interval_s`` the biller:

1. reads the tenants' reservations from the ledger (the one place they live; another
   replica's admin change reaches this one here at the latest) and pushes changes to the
   cache, so a reservation holds before the tenant's first request;
2. bills each tenant the bytes its reservation held on this replica's tiers during the
   interval that just ended: one usage row per tenant and interval, endpoint
   ``cache.reservation``, ``reserved_byte_seconds`` = bytes × elapsed milliseconds / 1000
   (rounded down), priced by the plan's ``cache_reservation`` (per GiB-hour). The row's
   request id names the replica's run, the tenant and the interval's start, so a retried
   record never bills twice; with the database away it goes to the usage spool as any
   request's does.

A reservation changed mid-interval is billed at the amount held at the interval's start
until the next tick (at most one interval late, either way). Stopping bills the partial
interval; a crash loses at most one interval of reservation billing (never a request's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

from kvgate.gateway.http.state import AppState
from kvgate.gateway.http.tenancy import tenant_namespace
from kvgate.gateway.ledger import LedgerError
from kvgate.gateway.ledger.billing import UsageEvent
from kvgate.gateway.ledger.reports import RESERVATION_ENDPOINT
from kvgate.gateway.usage import Usage

log = logging.getLogger("kvgate.reservations")

ENDPOINT = RESERVATION_ENDPOINT


class ReservationBiller:
    def __init__(self, state: AppState, model: str) -> None:
        self.state = state
        self.model = model
        self.run_id = uuid.uuid4().hex[:12]  # this process: request ids never collide
        self._held: dict[int, int] = {}  # tenant id -> bytes held on this replica's tiers
        self._since = time.monotonic()
        self._since_wall = datetime.now(UTC)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # the last partial interval, if it can be
            await self.bill()

    async def _loop(self) -> None:
        interval = max(1, int(self.state.settings.reservation_bill_interval_s))
        with contextlib.suppress(LedgerError):
            await self.sync()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.bill()
                await self.sync()
            except LedgerError as exc:  # the database is away: the tiers keep what they hold
                log.warning("cache reservations not read from the ledger: %s", exc)
            except Exception:
                log.exception("cache reservation billing failed")

    async def sync(self) -> None:
        """The ledger's reservations, to this replica's cache."""
        listed = set()
        for tenant in await self.state.ledger.list_tenants():
            listed.add(tenant["id"])
            reservation = (tenant["cache_reserved_device_bytes"],
                           tenant["cache_reserved_host_bytes"])
            self.state.quotas.reserve(tenant["id"], reservation)
        for tenant_id in set(await self._reserved()) - listed:  # deleted on another replica
            self.state.quotas.reserve(tenant_id, (None, None))
        self._held = await self._reserved()

    async def _reserved(self) -> dict[int, int]:
        """Bytes each tenant's reservation holds now, summed over the tiers."""
        held: dict[int, int] = {}
        for ns, tiers in (await self.state.engine.reservations()).items():
            prefix, _, tid = ns.partition(":")
            if prefix == "tenant" and tid.isdigit() and tenant_namespace(int(tid)) == ns:
                held[int(tid)] = sum(tiers.values())
        return held

    async def bill(self) -> int:
        """Bill the interval since the last bill; → rows recorded."""
        now, wall = time.monotonic(), datetime.now(UTC)
        elapsed_ms = int((now - self._since) * 1000)
        since_wall, held = self._since_wall, self._held
        self._since, self._since_wall = now, wall
        recorded = 0
        for tenant_id, nbytes in sorted(held.items()):
            byte_seconds = nbytes * elapsed_ms // 1000
            if byte_seconds <= 0:
                continue
            event = UsageEvent(
                request_id=(f"reservation-{self.run_id}-{tenant_id}-"
                            f"{int(since_wall.timestamp() * 1000)}"),
                tenant_id=tenant_id, key_id=None, model=self.model, endpoint=ENDPOINT,
                usage=Usage(reserved_byte_seconds=byte_seconds), status="ok",
                started_at=since_wall, finished_at=wall)
            billed = await self.state.ledger.record(event)
            if billed.new:
                recorded += 1
                self.state.metrics.observe_reservation(
                    self.state.metrics.tenant(tenant_id), byte_seconds, billed.cost_micros)
        return recorded
