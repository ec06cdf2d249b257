"""Cache events over a Redis/Valkey stream: replicas publish, routers follow.

One stream (``STREAM``) carries every replica's batches. A batch is one stream entry:
the replica's id, its epoch (a random id per process start), the numbers of its first and
last event (``CacheEvent.seq``, gap-free per epoch) and the events, JSON. A router that
sees a batch which does not continue the last one it applied for that replica (a gap: the
stream was trimmed, Redis lost entries, the publisher's buffer overflowed) or a new epoch
(the replica restarted) rebuilds that replica's view from its snapshot.

The publisher never slows serving: the index's sink only appends to a bounded deque; a
task sends what accumulated every few milliseconds. With Redis away, batches are dropped
(the routers will see the gap and resync); serving goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kvgate.cachestore.block import DEVICE, HOST, Tier
from kvgate.cachestore.events import CacheEvent, EventKind

log = logging.getLogger("kvgate.route")

STREAM = "kvgate:cache-events"
STREAM_MAXLEN = 200_000  # entries (batches) kept; older ones are trimmed (approximately)
_PUBLISH_EVERY_S = 0.005
_MAX_BATCH = 2_000  # events per stream entry
_BUFFER = 1_000_000  # events waiting to be sent; more are dropped (a gap the routers see)

_KINDS: dict[str, EventKind] = {"s": "stored", "r": "removed", "m": "moved"}
_TIERS: dict[str, Tier] = {"d": DEVICE, "h": HOST}


def encode_event(ev: CacheEvent) -> list[str]:
    return [ev.kind[0], ev.namespace, ev.block_hash.hex(), ev.tier[0]]


def decode_event(seq: int, raw: list[str]) -> CacheEvent:
    kind, namespace, digest, tier = raw
    return CacheEvent(seq, _KINDS[kind], namespace, bytes.fromhex(digest), _TIERS[tier])


@dataclass(frozen=True)
class EventBatch:
    """One stream entry: events ``first``..``last`` of one replica's epoch, in order."""

    replica: str
    epoch: str
    first: int
    last: int
    events: list[CacheEvent]

    def fields(self) -> dict[str, str]:
        return {"replica": self.replica, "epoch": self.epoch, "first": str(self.first),
                "last": str(self.last),
                "events": json.dumps([encode_event(e) for e in self.events])}

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> EventBatch:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        first = int(f["first"])
        raw = json.loads(f["events"])
        return cls(f["replica"], f["epoch"], first, int(f["last"]),
                   [decode_event(first + i, e) for i, e in enumerate(raw)])


def new_epoch() -> str:
    return secrets.token_hex(8)


class EventPublisher:
    """A replica's side: ``record`` is the cache index's sink (any thread), ``run`` sends."""

    def __init__(self, url: str, replica_id: str, epoch: str | None = None) -> None:
        self.url = url
        self.replica_id = replica_id
        self.epoch = epoch or new_epoch()
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
        """Send everything recorded so far (one entry per ``_MAX_BATCH`` events)."""
        while self._buffer:
            events: list[CacheEvent] = []
            while self._buffer and len(events) < _MAX_BATCH:
                ev = self._buffer.popleft()
                if events and ev.seq != events[-1].seq + 1:
                    self._buffer.appendleft(ev)  # the buffer overflowed here: a new batch
                    break
                events.append(ev)
            batch = EventBatch(self.replica_id, self.epoch, events[0].seq, events[-1].seq,
                               events)
            try:
                await self._redis.xadd(STREAM, batch.fields(),  # type: ignore[arg-type]
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


BatchHandler = Callable[[EventBatch], Awaitable[None]]


class EventFollower:
    """A router's side: reads the stream from where it started and hands on each batch."""

    def __init__(self, url: str, on_batch: BatchHandler) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._on_batch = on_batch
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
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("cache events unreadable (%s); retrying", exc)
                self.connected = False
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self.last_id = entry_id.decode()
                    try:  # any entry, however malformed (nested past the stack, wrong
                        batch = EventBatch.parse(fields)  # types), is skipped, never fatal
                    except Exception as exc:
                        log.warning("skipping a malformed cache event entry %s: %r",
                                    self.last_id, exc)
                        continue
                    try:
                        await self._on_batch(batch)
                    except Exception:
                        log.exception("cache event entry %s could not be applied",
                                      self.last_id)

    async def close(self) -> None:
        await self._redis.aclose()
