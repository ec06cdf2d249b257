"""A router's side of the cache events stream: it reads from where it started, checks each
entry (``protocol.wire.verify``) and hands on each batch, or each refusal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvgate.gateway.protocol.wire import STREAM, EventBatch, Rejected, verify

log = logging.getLogger("kvgate.route")


BatchHandler = Callable[[EventBatch], Awaitable[None]]


RejectHandler = Callable[[Rejected], None]


def _entry_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as numbers, in the order Redis sorts them."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class EventFollower:
    """A router's side: reads the stream from where it started, checks each entry
    (``verify``) and hands on each batch, or each refusal."""

    def __init__(self, url: str, on_batch: BatchHandler, key: bytes | None = None,
                 on_reject: RejectHandler | None = None) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._on_batch = on_batch
        self._on_reject = on_reject
        self.key = key
        self.rejected: dict[str, int] = {}  # reason -> entries refused
        self.last_id = "$"
        self.connected = False

    async def start_position(self) -> None:
        """Remember the stream's current end: snapshots taken after this cover what came
        before, and reading resumes from here."""
        entries: Any = await self._redis.xrevrange(STREAM, count=1)
        self.last_id = entries[0][0].decode() if entries else "0-0"

    async def run(self) -> None:
        while True:
            try:
                if self.last_id == "$":
                    await self.start_position()
                reply: Any = await self._redis.xread({STREAM: self.last_id}, block=1000, count=100)
                self.connected = True
                if not reply:  # a second with no entry: is the stream still ahead of us?
                    await self._check_position()
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("cache events unreadable (%s); retrying", exc)
                self.connected = False
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id.decode()
                    try:
                        batch = verify(fields, self.key)
                    except Rejected as exc:
                        self._reject(exc)
                        continue
                    try:
                        await self._on_batch(batch)
                    except Exception:
                        log.exception("cache event entry %s could not be applied",
                                      self.last_id)

    async def _check_position(self) -> None:
        """A stream whose newest entry is older than the last one read was deleted or
        recreated (an operator cleaning up, a failover to a Redis that lagged): its new
        entries all sort before where this router reads from, and it would never read
        another (one forged entry with the largest id, then the stream's deletion, blinded
        every running router for good). It is followed again from its end; the batches
        missed meanwhile show as a gap, and each view is rebuilt from its snapshot."""
        if self.last_id == "$":
            return
        entries: Any = await self._redis.xrevrange(STREAM, count=1)
        top = entries[0][0].decode() if entries else "0-0"
        if _entry_id(top) < _entry_id(self.last_id):
            log.warning("the cache events stream ends at entry %s, before entry %s this "
                        "router read last: it was deleted or replaced; following it from "
                        "its end", top, self.last_id)
            self.last_id = top

    async def close(self) -> None:
        await self._redis.aclose()

    def _reject(self, exc: Rejected) -> None:
        first = exc.reason not in self.rejected
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        # the first of each kind loudly, the rest at debug: a flood must not flood the log
        log.log(logging.WARNING if first else logging.DEBUG,
                "cache event entry %s refused (%s)%s", self.last_id, exc,
                "; further refusals are counted in kvgate_router_events_rejected_total"
                if first else "")
        if self._on_reject is not None:
            try:
                self._on_reject(exc)
            except Exception:
                log.exception("cache event refusal of %s not handled", self.last_id)
