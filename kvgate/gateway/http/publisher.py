"""A replica's cache events publisher: the index's sink only appends to a bounded deque; a
task sends what accumulated every few milliseconds as signed batches (``protocol.wire``).
With Redis away, batches are dropped (the routers see the gap and resync); serving goes on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvgate.cachestore.events import CacheEvent
from kvgate.gateway.protocol.wire import MAX_BATCH, STREAM, STREAM_MAXLEN, EventBatch, new_epoch

log = logging.getLogger("kvgate.events")


_PUBLISH_EVERY_S = 0.005


_BUFFER = 1_000_000  # events waiting to be sent; more are dropped (a gap the routers see)


class EventPublisher:
    """A replica's side: ``record`` is the cache index's sink (any thread), ``run`` sends."""

    def __init__(self, url: str, replica_id: str, epoch: str | None = None,
                 key: bytes | None = None) -> None:
        self.url = url
        self.replica_id = replica_id
        self.epoch = epoch or new_epoch()
        self.key = key  # None: batches go out unsigned (--events-unsigned)
        self._buffer: deque[CacheEvent] = deque(maxlen=_BUFFER)
        self._redis = aioredis.Redis.from_url(url)
        self.published = 0  # events sent
        self.dropped = 0  # events lost to a Redis outage (the routers resync)
        self._warned = False

    def record(self, event: CacheEvent) -> None:
        self._buffer.append(event)  # deque.append is atomic; a full deque drops the oldest

    async def run(self) -> None:
        while True:
            if not self._buffer:
                await asyncio.sleep(_PUBLISH_EVERY_S)
                continue
            await self.flush()

    async def flush(self) -> None:
        """Send everything recorded so far (one entry per ``MAX_BATCH`` events)."""
        while self._buffer:
            events: list[CacheEvent] = []
            while self._buffer and len(events) < MAX_BATCH:
                ev = self._buffer.popleft()
                if events and ev.seq != events[-1].seq + 1:
                    self._buffer.appendleft(ev)  # the buffer overflowed here: a new batch
                    break
                events.append(ev)
            batch = EventBatch(self.replica_id, self.epoch, events[0].seq, events[-1].seq,
                               events)
            try:
                await self._redis.xadd(STREAM, batch.fields(self.key),  # type: ignore[arg-type]
                                       maxlen=STREAM_MAXLEN, approximate=True)
                self.published += len(events)
                self._warned = False
            except (RedisError, OSError) as exc:
                self.dropped += len(events)
                if not self._warned:
                    log.warning("cache events not published (%s): routers will resync from "
                                "this replica's snapshot", exc)
                    self._warned = True

    async def close(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError, RedisError, OSError):
            await asyncio.wait_for(self.flush(), 2.0)
        await self._redis.aclose()
