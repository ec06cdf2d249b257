"""The router's view of every replica's cache, kept exact by cache events.

Per replica: the hashes of its indexed blocks (namespace-scoped, so one set serves every
tenant) with their tier, the epoch and the last event number applied. A replica's cache
is prefix-closed (a dropped block takes its descendants with it), so the cached prefix of
a prompt on a replica is the run of the prompt's block hashes, from the first, that the
replica holds.

A view is only ever advanced by batches the router has checked (``protocol.wire.verify``: signed,
a range a publisher could send) and replaced by snapshots it fetched itself over the
replicas' admin-authenticated HTTP path. ``freeze`` and ``compare`` let the router check
a view against a fresh snapshot (reconciliation): the view as of the snapshot's event
number is the frozen view plus the batches kept since, so in a healthy deployment the
comparison finds nothing, and anything it finds was lost or forged.

Beside the exact view, a router's own provisional entries (``expect``): the blocks of a
prompt it has just sent to a replica, counted as cached there for ``EXPECT_S`` or until
the replica's events speak of them (stored: the view holds them; evicted: they are gone),
so the next request of the same prefix, sent before those events arrive, follows it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvgate.cachestore.block import Tier
from kvgate.cachestore.events import CacheEvent
from kvgate.gateway.protocol.wire import EventBatch


@dataclass
class ReplicaView:
    epoch: str = ""
    seq: int = 0
    synced: bool = False  # False: events were missed; the view waits for a snapshot
    blocks: dict[bytes, Tier] = field(default_factory=dict)
    pending: list[EventBatch] = field(default_factory=list)  # kept while not synced

    def apply(self, events: Iterable[CacheEvent]) -> None:
        for ev in events:
            if ev.kind == "removed":
                self.blocks.pop(ev.block_hash, None)
            else:
                self.blocks[ev.block_hash] = ev.tier
            self.seq = ev.seq


_MAX_PENDING = 10_000  # batches kept while a snapshot is awaited
EXPECT_S = 10.0  # how long a provisional entry counts
_MAX_EXPECTED = 200_000  # provisional entries per replica before the lapsed are dropped


class ClusterIndex:
    def __init__(self) -> None:
        self.views: dict[str, ReplicaView] = {}
        self.resyncs = 0  # snapshots loaded (for /metrics and tests)
        self.gaps = 0  # batches that showed missed events
        self.expected: dict[str, dict[bytes, float]] = {}  # replica -> hash -> until

    def view(self, replica: str) -> ReplicaView:
        v = self.views.get(replica)
        if v is None:
            v = self.views[replica] = ReplicaView()
        return v

    def apply(self, batch: EventBatch) -> bool:
        """Apply a batch; False when this view has missed events (a gap or a new epoch)
        and waits for a snapshot (``load``). Meanwhile batches are kept to be replayed
        over the snapshot. Batches the view already holds are skipped."""
        v = self.view(batch.replica)
        if v.synced and (batch.epoch != v.epoch or batch.first > v.seq + 1):
            v.synced = False
            v.pending = []
            self.gaps += 1
        if not v.synced:
            if len(v.pending) < _MAX_PENDING:
                v.pending.append(batch)
            return False
        fresh = [e for e in batch.events if e.seq > v.seq]
        v.apply(fresh)
        self._settle(batch.replica, fresh)
        return True

    def _settle(self, replica: str, events: Iterable[CacheEvent]) -> None:
        """The replica has spoken of these blocks: its word replaces this router's
        provisional entries for them. A block it evicted is gone, however recently the
        router sent it a prompt that held it (a provisional entry that outlived the
        eviction had the router send conversations where their prefix no longer was)."""
        e = self.expected.get(replica)
        if e:
            for ev in events:
                e.pop(ev.block_hash, None)

    def load(self, replica: str, epoch: str, seq: int,
             blocks: Iterable[tuple[bytes, Tier]]) -> bool:
        """Replace the view with a snapshot (the blocks as of event ``seq``), then replay the
        batches kept since the gap. False when those do not continue it (load again)."""
        v = self.view(replica)
        if v.epoch and epoch != v.epoch:  # a restart: what was expected there is gone
            self.expected.pop(replica, None)
        v.epoch, v.seq, v.synced = epoch, seq, True
        v.blocks = dict(blocks)
        self.resyncs += 1
        pending, v.pending = v.pending, []
        for batch in pending:
            if batch.epoch != epoch or batch.last <= v.seq:
                continue
            if batch.first > v.seq + 1:
                v.synced = False
                return False
            fresh = [e for e in batch.events if e.seq > v.seq]
            v.apply(fresh)
            self._settle(replica, fresh)
        return True

    def freeze(self, replica: str) -> bool:
        """Stop advancing ``replica``'s view (it still answers lookups) and keep the batches
        that arrive, until the snapshot about to be fetched is ``load``-ed: ``compare`` can
        then tell the view as of the snapshot. False when there is no view to compare."""
        v = self.views.get(replica)
        if v is None or not v.epoch:
            return False
        if v.synced:
            v.synced = False
            v.pending = []
        return True

    def compare(self, replica: str, epoch: str, seq: int,
                blocks: dict[bytes, Tier]) -> int | None:
        """How many blocks differ between a snapshot (``blocks`` as of event ``seq``) and
        this router's view as of the same event: held by one and not the other, or on
        another tier. None when they cannot be compared (another epoch, or events between
        the view and the snapshot that this router never had). A view *ahead* of the
        snapshot was fed events its replica never made: it is compared as it stands."""
        v = self.views.get(replica)
        if v is None or v.epoch != epoch:
            return None
        expected = dict(v.blocks)
        at = v.seq
        for batch in v.pending:
            if at >= seq:
                break
            if batch.epoch != epoch or batch.last <= at:
                continue
            if batch.first > at + 1:
                return None
            for ev in batch.events:
                if ev.seq <= at:
                    continue
                if ev.seq > seq:
                    break
                if ev.kind == "removed":
                    expected.pop(ev.block_hash, None)
                else:
                    expected[ev.block_hash] = ev.tier
                at = ev.seq
        if at < seq:
            return None
        return (sum(1 for h, tier in expected.items() if blocks.get(h) != tier)
                + sum(1 for h in blocks if h not in expected))

    def forget(self, replica: str) -> None:
        self.views.pop(replica, None)
        self.expected.pop(replica, None)

    def expect(self, replica: str, hashes: Sequence[bytes]) -> None:
        """The router sent a prompt with these blocks to ``replica``: count them as cached
        there for ``EXPECT_S``."""
        now = time.monotonic()
        e = self.expected.setdefault(replica, {})
        if len(e) + len(hashes) > _MAX_EXPECTED:
            for h in [h for h, until in e.items() if until < now]:
                del e[h]
            if len(e) + len(hashes) > _MAX_EXPECTED:
                e.clear()
        until = now + EXPECT_S
        for h in hashes:
            e[h] = until

    def cached_blocks(self, replica: str, hashes: Sequence[bytes],
                      expected: bool = False) -> int:
        """How many of the prompt's leading blocks the replica holds (by its events; with
        ``expected``, or by this router's provisional entries)."""
        v = self.views.get(replica)
        blocks = v.blocks if v is not None else {}
        e = self.expected.get(replica) if expected else None
        now = time.monotonic() if e else 0.0
        n = 0
        for h in hashes:
            if h not in blocks and (not e or e.get(h, 0.0) < now):
                break
            n += 1
        return n
