"""Which eviction order to follow: a shadow simulation of each candidate on sampled blocks.

Set dueling (as in DIP, SHiP and ARC's adaptivity): a fixed fraction of block hashes (by
their low bits, so the same blocks every time) is replayed through one small simulated
cache per order (``orders.ORDERS``), each at the real capacity scaled by that fraction.
Their hits, decayed so that the last few thousand sampled accesses count, say which order
wins on the traffic of now; the real cache follows the winner. The shadows see what
``match`` sees (each prompt's block hashes with their TTLs, at the store's clock) and
nothing else: no prefix rule, running sequences, shares or quotas. They judge the orders
against each other; they do not predict the real hit rate.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Sequence

from kvgate.cachestore.orders import ORDERS, STALE_S, Segments


def sample_threshold(capacity: int, min_rate: float = 1 / 16, min_blocks: int = 256) -> int:
    """Hashes whose low 16 bits fall below this are sampled: 1/16 of them, more for small
    caches so each shadow holds at least ``min_blocks`` (everything below that)."""
    if capacity <= 0:
        return 0
    rate = min(1.0, max(min_rate, min_blocks / capacity))
    return max(1, round(rate * 65536))


def sampled(block_hash: bytes, threshold: int) -> bool:
    return int.from_bytes(block_hash[-2:], "little") < threshold


class ShadowCache:
    """A bookkeeping-only cache of hashes following one order; counts its hits."""

    def __init__(
        self, mode: str, capacity: int, protected: float = 0.75, stale_s: float = STALE_S,
    ) -> None:
        if mode not in ORDERS:
            raise ValueError(f"unknown eviction order {mode!r}")
        self.order = ORDERS[mode]
        self.capacity = max(1, capacity)
        self.protected_cap = int(self.capacity * protected)
        self.fresh: OrderedDict[bytes, int] = OrderedDict()  # hash -> group, oldest first
        self.reused: OrderedDict[bytes, None] = OrderedDict()
        self.expires: dict[bytes, float] = {}  # every key held
        self.ghosts: OrderedDict[bytes, None] = OrderedDict()
        self.ghost_cap = 2 * self.capacity
        self._heap: list[tuple[float, bytes]] = []
        self._group = 0
        self.stale_s = stale_s
        self.used: dict[bytes, float] = {}  # key -> last access
        self.now = 0.0

    def __len__(self) -> int:
        return len(self.expires)

    def access(self, keys: Sequence[tuple[bytes, float]], now: float) -> int:
        """One prompt's sampled hashes with their TTLs, in order: → hits; then they stay."""
        self._expire(now)
        self.now = now
        if len({k for k, _ in keys}) < len(keys):  # a hash repeated (collisions): once
            first: dict[bytes, float] = {}
            for k, t in keys:
                first.setdefault(k, t)
            keys = list(first.items())
        hits = 0
        reused: list[bytes] = []
        fresh: list[bytes] = []
        for key, _ in keys:
            if key in self.expires:
                hits += 1
                self._unlink(key)
                reused.append(key)
            elif key in self.ghosts and self.order.segmented:
                del self.ghosts[key]
                reused.append(key)
            else:
                fresh.append(key)
        self._make_room(self.capacity - len(keys))
        self._group += 1
        for key, ttl_s in keys:
            exp = now + ttl_s
            self.expires[key] = exp
            self.used[key] = now
            heapq.heappush(self._heap, (exp, key))
        if not self.order.segmented:
            for key in reversed(fresh + reused):
                self.fresh[key] = self._group
        else:
            for key in reversed(fresh):
                self.fresh[key] = self._group
            for key in reversed(reused):
                self.reused[key] = None
            while len(self.reused) > self.protected_cap:
                aged, _ = self.reused.popitem(last=False)
                self.fresh[aged] = self._group
        self._make_room(self.capacity)
        return hits

    def _make_room(self, limit: int) -> None:
        over = len(self.expires) - max(0, limit)
        if over <= 0:
            return
        gone = []
        # ``fresh`` holds every key when the order is not segmented, by last use
        segments = Segments(self.fresh, self.fresh, self.reused, self.fresh, self.used)
        for key in self.order.victims(segments, self.now - self.stale_s):
            gone.append(key)
            if len(gone) == over:
                break
        for key in gone:
            self._drop(key)

    def _unlink(self, key: bytes) -> None:
        self.fresh.pop(key, None)
        self.reused.pop(key, None)

    def _drop(self, key: bytes) -> None:
        self._unlink(key)
        if self.expires.pop(key, None) is None:
            return
        del self.used[key]
        if self.order.segmented:
            self.ghosts[key] = None
            self.ghosts.move_to_end(key)
            if len(self.ghosts) > self.ghost_cap:
                self.ghosts.popitem(last=False)

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            exp, key = heapq.heappop(heap)
            if self.expires.get(key) == exp:
                self._drop(key)
        if len(heap) > 4 * self.capacity + 64:  # stale entries of re-accessed keys
            self._heap = [(e, k) for k, e in self.expires.items()]
            heapq.heapify(self._heap)


class Duel:
    """Shadows of every candidate order on the sampled hashes; ``choice`` is the winner.

    Scores are hits decayed per sampled access (``window`` accesses weigh about as much as
    all before them); the choice changes only when another order leads the current one by
    ``margin`` of the current one's score, and the lead is significant: the decayed sum of
    the per-prompt differences of the two shadows' hits is at least ``z`` of its standard
    error (estimated from the same differences, a paired test). Not before ``warmup``
    sampled accesses were seen either (the starting order, segmented LRU, is the one that
    resists a scan of one-off documents from the first request on).

    Why the test: every switch costs what the old order kept (the older subset ``newest``
    held, the reused segment ``slru`` built) before the new one pays off, so following
    noise between orders whose hit rates differ by a few percent is worse than following
    any one of them. With small shadows (a small cache) the scores' noise is of the order
    of that difference.
    """

    def __init__(
        self, capacity: int, protected: float = 0.75, start: str = "slru",
        window: int | None = None, margin: float = 0.05, stale_s: float = STALE_S,
        z: float = 2.0,
    ) -> None:
        self.threshold = sample_threshold(capacity)
        scaled = max(1, round(capacity * self.threshold / 65536))
        self.shadows = {mode: ShadowCache(mode, scaled, protected, stale_s) for mode in ORDERS}
        self.scores = dict.fromkeys(ORDERS, 0.0)
        self.choice = start
        self.window = window if window is not None else max(1024, 16 * scaled)
        self.margin = margin
        self.warmup = max(256, 4 * scaled)
        self.switches = 0
        self.seen = 0  # sampled accesses so far
        self.z = z
        # per pair of orders (a, b): decayed sums of (hits of a - hits of b) per prompt and
        # of its square (decayed twice as fast: the variance of the first sum)
        names = list(ORDERS)
        self._pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        self._diff = {pair: 0.0 for pair in self._pairs}
        self._diff_sq = {pair: 0.0 for pair in self._pairs}

    def observe(self, keys: Sequence[tuple[bytes, float]], now: float) -> None:
        """A prompt's block hashes (with TTLs), in order; only the sampled ones count."""
        picked = [(h, ttl) for h, ttl in keys if sampled(h, self.threshold)]
        if not picked:
            return
        decay = (1.0 - 1.0 / self.window) ** len(picked)
        hits = {mode: shadow.access(picked, now) for mode, shadow in self.shadows.items()}
        for mode in ORDERS:
            self.scores[mode] = self.scores[mode] * decay + hits[mode]
        for pair in self._pairs:
            d = hits[pair[0]] - hits[pair[1]]
            self._diff[pair] = self._diff[pair] * decay + d
            self._diff_sq[pair] = self._diff_sq[pair] * decay * decay + d * d
        self.seen += len(picked)
        if self.seen < self.warmup:  # too little evidence yet: keep the starting order
            return
        best = max(ORDERS, key=lambda m: self.scores[m])
        current = self.scores[self.choice]
        if (best != self.choice and self.scores[best] > current * (1.0 + self.margin) + 0.5
                and self.lead(best, self.choice) >= self.z):
            self.choice = best
            self.switches += 1

    def lead(self, a: str, b: str) -> float:
        """How many standard errors order ``a``'s decayed hits lead ``b``'s by."""
        if a == b:
            return 0.0
        sign = 1.0 if (a, b) in self._diff else -1.0
        pair = (a, b) if sign > 0 else (b, a)
        var = self._diff_sq[pair]
        return sign * self._diff[pair] / math.sqrt(var) if var > 0 else 0.0
