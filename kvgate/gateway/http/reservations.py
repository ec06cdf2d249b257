"""Cache reservations: applied to this replica's tiers and billed per byte-hour; explicit
caches' storage billed per token-hour (``CacheStorageBiller``, at the end).

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
from datetime import UTC, datetime, timedelta

from kvgate.gateway.engine.request import EngineUnavailable
from kvgate.gateway.http.state import AppState
from kvgate.gateway.ledger import LedgerError
from kvgate.gateway.ledger.billing import UsageEvent
from kvgate.gateway.ledger.reports import RESERVATION_ENDPOINT, STORAGE_ENDPOINT
from kvgate.gateway.protocol.namespace import tenant_namespace
from kvgate.gateway.usage import Usage

log = logging.getLogger("kvgate.reservations")

ENDPOINT = RESERVATION_ENDPOINT


class _Periodic:
    """A biller's loop as a task of the running event loop: ``start``, then ``stop``."""

    _task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # it ended early; what stops after it must still stop
                log.exception("%s had stopped", type(self).__name__)


class ReservationBiller(_Periodic):
    def __init__(self, state: AppState, model: str) -> None:
        self.state = state
        self.model = model
        self.run_id = uuid.uuid4().hex[:12]  # this process: request ids never collide
        self._held: dict[int, int] = {}  # tenant id -> bytes held on this replica's tiers
        self._since = time.monotonic()
        self._since_wall = datetime.now(UTC)

    async def stop(self) -> None:
        await super().stop()
        with contextlib.suppress(Exception):  # the last partial interval, if it can be
            await self.bill()

    async def _loop(self) -> None:
        interval = max(1, int(self.state.settings.cache.reservation_bill_interval_s))
        with contextlib.suppress(LedgerError, EngineUnavailable):  # again each interval
            await self.sync()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.bill()
                await self.sync()
            except LedgerError as exc:  # the database is away: the tiers keep what they hold
                log.warning("cache reservations not read from the ledger: %s", exc)
            except EngineUnavailable as exc:  # the core restarts: read again next interval
                log.warning("cache reservations not read from the engine: %s", exc)
            except Exception:
                log.exception("cache reservation billing failed")

    async def sync(self) -> None:
        """The ledger's reservations, to this replica's cache."""
        listed = set()
        totals = {"device": 0, "host": 0}
        for tenant in await self.state.ledger.list_tenants():
            listed.add(tenant["id"])
            reservation = (tenant["cache_reserved_device_bytes"],
                           tenant["cache_reserved_host_bytes"])
            self.state.quotas.reserve(tenant["id"], reservation)
            totals["device"] += reservation[0] or 0
            totals["host"] += reservation[1] or 0
        for tier, capacity in self.state.engine.tier_bytes().items():
            if totals[tier] > capacity:  # set where no replica could check (the CLI)
                log.warning("the %s tier is over-reserved: tenants reserve %d bytes of its %d; "
                            "lower their cache_reserved_%s_bytes (each reservation is held "
                            "as far as the tier goes)", tier, totals[tier], capacity, tier)
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


class CacheStorageBiller(_Periodic):
    """Explicit caches (``http.caches``): storage billed per token-hour, expired ones unpinned.

    Time is cut into intervals of ``reservation_bill_interval_s`` aligned on the epoch, the
    same on every replica. Once an interval has ended, each cache that was live during it
    is billed the tokens it holds × the milliseconds of the interval it was live (from its
    creation to its expiry or deletion) / 1000, rounded down: one usage row per cache and
    interval, endpoint ``cache.storage``, whose request id names the cache and the
    interval's start. Every replica bills the same rows under the same ids, so a cache is
    billed once whichever replicas run; a replica that starts bills the interval before
    too, so a restart within an interval loses nothing. The last interval of a gateway that
    stops for good, and never starts again, is not billed.

    The same tick unpins, on this replica, the caches whose time is up or which another
    replica deleted.
    """

    CATCH_UP = 2  # intervals billed at start: the current one's predecessor and the one before

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.interval = max(1, int(state.settings.cache.reservation_bill_interval_s))
        self._billed_until: int | None = None  # epoch seconds: intervals before are billed

    async def _loop(self) -> None:
        while True:
            try:
                await self.bill()
                await self.sweep()
            except LedgerError as exc:
                log.warning("explicit caches not billed from the ledger: %s", exc)
            except EngineUnavailable as exc:  # the core restarts: its pins went with it
                log.warning("explicit caches not unpinned in the engine: %s", exc)
            except Exception:
                log.exception("explicit cache storage billing failed")
            now = time.time()
            await asyncio.sleep(self.interval - now % self.interval + 0.05)

    async def bill(self) -> int:
        """Bill every ended interval not billed yet; → rows recorded."""
        end = int(time.time()) // self.interval * self.interval
        start = (end - self.CATCH_UP * self.interval if self._billed_until is None
                 else self._billed_until)
        recorded = 0
        for t0 in range(start, end, self.interval):
            recorded += await self._bill_interval(t0, t0 + self.interval)
            self._billed_until = t0 + self.interval
        return recorded

    async def _bill_interval(self, t0: int, t1: int) -> int:
        since, until = datetime.fromtimestamp(t0, UTC), datetime.fromtimestamp(t1, UTC)
        recorded = 0
        for cache in await self.state.ledger.caches_held(since, until):
            gone = cache["expires_at"]
            if cache["deleted_at"] is not None:
                gone = min(gone, cache["deleted_at"])
            begin, finish = max(since, cache["created_at"]), min(until, gone)
            held_ms = (finish - begin) // timedelta(milliseconds=1)
            token_seconds = cache["tokens"] * held_ms // 1000
            if token_seconds <= 0:
                continue
            event = UsageEvent(
                request_id=f"storage-{cache['id']}-{t0}", tenant_id=cache["tenant_id"],
                key_id=None, model=cache["model"], endpoint=STORAGE_ENDPOINT,
                usage=Usage(stored_token_seconds=token_seconds), status="ok",
                started_at=begin, finished_at=finish)
            if (await self.state.ledger.record(event)).new:
                recorded += 1
        return recorded

    async def sweep(self) -> int:
        """Unpin the caches pinned here that expired or were deleted; → caches unpinned."""
        pinned = dict(self.state.explicit_caches)
        if not pinned:
            return 0
        live = await self.state.ledger.live_cache_ids(list(pinned))
        gone = [cid for cid in pinned if cid not in live]
        for cid in gone:
            self.state.explicit_caches.pop(cid, None)
            await self.state.engine.unpin(pinned[cid], cid)
        return len(gone)
