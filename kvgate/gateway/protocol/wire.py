"""What replicas and routers exchange: cache event batches on a Redis/Valkey stream
(replicas publish, ``http.publisher``; routers follow, ``route.events``), a replica's load
report and its cache snapshot. docs/architecture.md, "Cache events", says why each check
is there.

A batch is one stream entry: the replica's id, its epoch (a random id per process start),
the numbers of its first and last event (gap-free per epoch), the events, and ``mac``, an
HMAC-SHA256 over all of these under a key derived from the deployment's events secret.
``verify`` turns an entry into a batch only if its MAC checks out and its range is one a
publisher could have sent; otherwise it raises ``Rejected`` with the reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvgate.cachestore.block import DEVICE, HOST, Tier
from kvgate.cachestore.events import CacheEvent, EventKind

log = logging.getLogger("kvgate.route")

STREAM = "kvgate:cache-events"
STREAM_MAXLEN = 200_000  # entries (batches) kept; older ones are trimmed (approximately)
MAX_BATCH = 2_000  # events per stream entry: a publisher never sends more in one

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


# A replica's /admin/load and /admin/cache/snapshot bodies: written by the replica
# (``http.cluster``), read by the router (``route.pool``, ``route.app``).


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica's identity and load as it reports them (routers poll it as the health
    check). ``event_seq`` is the number of its last cache event (None: a replica too old to
    say)."""

    replica_id: str
    epoch: str
    model_id: str
    block_size: int
    queue_depth: int
    running: int
    free_pages: int
    device_pages: int
    events: bool
    event_seq: int | None

    def body(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "epoch": self.epoch, "model_id": self.model_id,
                "block_size": self.block_size, "queue_depth": self.queue_depth,
                "running": self.running, "free_pages": self.free_pages,
                "device_pages": self.device_pages, "events": self.events,
                "event_seq": self.event_seq}

    @classmethod
    def parse(cls, body: Any) -> ReplicaLoad:
        """Raises ``ValueError`` or ``TypeError`` for a body that is not a report."""
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        try:
            event_seq: int | None = int(body["event_seq"])
        except (KeyError, TypeError, ValueError):
            event_seq = None
        return cls(str(body.get("replica_id", "")), str(body.get("epoch", "")),
                   str(body.get("model_id", "")), int(body.get("block_size", 0)),
                   int(body.get("queue_depth", 0)), int(body.get("running", 0)),
                   int(body.get("free_pages", 0)), int(body.get("device_pages", 0)),
                   bool(body.get("events", False)), event_seq)


@dataclass(frozen=True)
class Snapshot:
    """Every indexed block of a replica (namespace-scoped hash → tier) and the number of
    the last cache event before it was taken."""

    replica_id: str
    epoch: str
    seq: int
    model_id: str
    block_size: int
    blocks: dict[bytes, Tier]


def snapshot_body(replica_id: str, epoch: str, seq: int, model_id: str, block_size: int,
                  blocks: Iterable[tuple[str, bytes, Tier]]) -> dict[str, Any]:
    """``blocks``: (namespace, block hash, tier) of each indexed block."""
    return {"replica_id": replica_id, "epoch": epoch, "seq": seq, "model_id": model_id,
            "block_size": block_size,
            "blocks": [[ns, digest.hex(), tier[0]] for ns, digest, tier in blocks]}


def parse_snapshot(body: Any) -> Snapshot:
    """Raises ``KeyError``, ``ValueError`` or ``TypeError`` for a body that is not one."""
    return Snapshot(str(body["replica_id"]), str(body["epoch"]), int(body["seq"]),
                    str(body.get("model_id", "")), int(body.get("block_size", 0)),
                    {bytes.fromhex(h): _TIERS[t] for _ns, h, t in body["blocks"]})
