"""Cache events over a Redis/Valkey stream: replicas publish, routers follow.

One stream (``STREAM``) carries every replica's batches. A batch is one stream entry:
the replica's id, its epoch (a random id per process start), the numbers of its first and
last event (``CacheEvent.seq``, gap-free per epoch), the events, JSON, and ``mac``: an
HMAC-SHA256 over all of these with a key derived from the deployment's events secret
(``events_key``). A router that
sees a batch which does not continue the last one it applied for that replica (a gap: the
stream was trimmed, Redis lost entries, the publisher's buffer overflowed) or a new epoch
(the replica restarted) rebuilds that replica's view from its snapshot.

Whoever can write to the stream is not trusted: ``verify`` turns an entry into a batch
only if its MAC checks out under the router's key and its range is one a publisher could
have sent (``first`` ≥ 1, exactly ``last - first + 1`` events, at most ``MAX_BATCH``);
otherwise it raises ``Rejected`` with the reason the router counts.

The publisher never slows serving: the index's sink only appends to a bounded deque; a
task sends what accumulated every few milliseconds. With Redis away, batches are dropped
(the routers will see the gap and resync); serving goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
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
MAX_BATCH = 2_000  # events per stream entry: a publisher never sends more in one
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

    def fields(self, key: bytes | None = None) -> dict[str, str]:
        """The stream entry; with ``key``, signed."""
        f = {"replica": self.replica, "epoch": self.epoch, "first": str(self.first),
             "last": str(self.last),
             "events": json.dumps([encode_event(e) for e in self.events])}
        if key is not None:
            f["mac"] = batch_mac(key, [f[n.decode()].encode() for n in _FIELDS]).hex()
        return f

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> EventBatch:
        f = {k.decode(): v.decode() for k, v in fields.items()}
        first = int(f["first"])
        raw = json.loads(f["events"])
        return cls(f["replica"], f["epoch"], first, int(f["last"]),
                   [decode_event(first + i, e) for i, e in enumerate(raw)])


_FIELDS = (b"replica", b"epoch", b"first", b"last", b"events")


def events_key(secret: str) -> bytes:
    """The MAC key of cache events, derived from the deployment's secret: the same secret
    may sign the shared tier's entries, whose MACs can then never pass for a batch's."""
    return hmac.new(secret.encode(), b"kvgate cache events v1", hashlib.sha256).digest()


def batch_mac(key: bytes, parts: list[bytes]) -> bytes:
    """HMAC-SHA256 over the batch's fields as sent, each with its length (no field can
    borrow bytes from the next)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.digest()


class EventsMisconfigured(ValueError):
    """Cache events asked for with no secret to sign or check them, and no opt-out."""


def key_for(events_url: str, events_secret: str | None, shared_tier_secret: str | None,
            unsigned: bool, who: str) -> bytes | None:
    """The events MAC key of a replica or router: from ``KVGATE_EVENTS_SECRET``, else the
    shared tier's secret. With neither, refuse (``EventsMisconfigured``) unless the operator
    chose ``--events-unsigned``: then None, and a warning that says what that allows."""
    secret = events_secret or shared_tier_secret
    if secret:
        return events_key(secret)
    if not events_url:
        return None
    if not unsigned:
        raise EventsMisconfigured(
            "--events-url is set but no secret signs the cache events: set "
            "KVGATE_EVENTS_SECRET (the same value on every replica and router; e.g. "
            "`openssl rand -hex 32`), or KVGATE_SHARED_TIER_SECRET, or accept unsigned "
            "events with --events-unsigned 1 (then whoever can write to the stream steers "
            "the routers)")
    log.warning("%s: cache events are NOT signed (--events-unsigned): anyone who can write "
                "to %s can steer routing; set KVGATE_EVENTS_SECRET on every replica and "
                "router", who, STREAM)
    return None


class Rejected(Exception):
    """A stream entry that is not a batch to apply. ``reason`` is the metric's label;
    ``replica`` is the id the entry names when it is trusted (signed), else None."""

    def __init__(self, reason: str, detail: str = "", replica: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.replica = replica


def verify(fields: dict[bytes, bytes], key: bytes | None) -> EventBatch:
    """The batch in a stream entry, checked. ``key`` None: the deployment runs unsigned
    (``--events-unsigned``) and any MAC is ignored."""
    if key is not None:
        mac = fields.get(b"mac")
        if mac is None:
            raise Rejected("unsigned")
        if any(not isinstance(fields.get(f), bytes) for f in _FIELDS):
            raise Rejected("malformed", "a field is missing")
        expected = batch_mac(key, [fields[f] for f in _FIELDS])
        try:
            given = bytes.fromhex(mac.decode("ascii"))
        except ValueError:
            raise Rejected("bad_signature") from None
        if not hmac.compare_digest(given, expected):
            raise Rejected("bad_signature")
    trusted = fields[b"replica"].decode(errors="replace") if key is not None else None
    try:  # the range first: a batch of a million events is refused before it is parsed
        first, last = int(fields[b"first"]), int(fields[b"last"])
    except Exception as exc:
        raise Rejected("malformed", repr(exc)) from None
    if first < 1 or last < first or last - first + 1 > MAX_BATCH:
        raise Rejected("impossible_range", f"events {first}..{last}", trusted)
    try:  # any entry, however malformed (nested past the stack, wrong types), is refused
        batch = EventBatch.parse(fields)
    except Exception as exc:
        raise Rejected("malformed", repr(exc)) from None
    if batch.last - batch.first + 1 != len(batch.events):
        raise Rejected("impossible_range",
                       f"events {batch.first}..{batch.last} in {len(batch.events)}", trusted)
    return batch


def new_epoch() -> str:
    return secrets.token_hex(8)


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


BatchHandler = Callable[[EventBatch], Awaitable[None]]
RejectHandler = Callable[[Rejected], None]


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
