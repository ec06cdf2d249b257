"""What to evict: an order over each tier's idle blocks, TTLs, quotas, pins, and holds for
queued requests.

The policy never touches pages; it orders blocks and answers "who goes next". The index
tells it when a block turns idle or active (``PrefixIndex.ref``/``unref``); the store and
``TierMoves`` ask it for victims and move them. It keeps each tier's idle blocks as the
orders read them (``orders.Segments``) and follows a fixed order or, ``adaptive``, the
duel's winner (``duel.py``). A released chain is one group, added deepest block first, so a
prefix never goes before its extensions. Held blocks (``hold``) go after every other
candidate. With a shares filter (``shares.EvictFilter``) the victims come from merging
per-namespace sub-orders (``_victims_by_budget``): an allocation's work grows with the
blocks it takes, not with the protected blocks ahead of them. docs/architecture.md
(Eviction order) has the reasons and the measurements.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator

from kvgate.cachestore.block import DEVICE, HOST, Block, Tier
from kvgate.cachestore.duel import Duel
from kvgate.cachestore.orders import ORDERS, STALE_S, EvictionOrder, Key, Segments
from kvgate.cachestore.shares import EvictFilter


class EvictionPolicy:
    def __init__(
        self, device_pages: int = 0, host_pages: int = 0, protected: float = 0.75,
        mode: str = "adaptive", stale_s: float = STALE_S,
    ) -> None:
        """``mode``: one of ``ORDERS`` (a fixed order) or ``adaptive`` (the duel's winner)."""
        if mode != "adaptive" and mode not in ORDERS:
            raise ValueError(f"unknown eviction mode {mode!r}")
        # Segmented LRU: blocks never reused wait in ``_probation`` and go first; reused ones
        # (shared system prompts, conversation prefixes) sit in ``_protected``, capped at a
        # share of the tier so stale favourites age back into probation.
        self._probation: dict[Tier, OrderedDict[Block, None]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._protected: dict[Tier, OrderedDict[Block, None]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._protected_cap: dict[Tier, int] = {
            DEVICE: int(device_pages * protected), HOST: int(host_pages * protected)}
        # Plain recency over both segments (the ``lru`` order) and each idle block's release
        # group (blocks released together share one: the ``newest`` order's unit).
        self._recency: dict[Tier, OrderedDict[Block, None]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._group: dict[Block, int] = {}
        self._since: dict[Block, float] = {}  # when it became idle (store clock)
        self._groups = itertools.count()
        self._ns_lru: dict[Tier, defaultdict[str, OrderedDict[Block, None]]] = {
            DEVICE: defaultdict(OrderedDict),
            HOST: defaultdict(OrderedDict),
        }
        # Hashes of recently dropped blocks, oldest first: a rewrite of one is a reuse.
        self._ghosts: OrderedDict[bytes, None] = OrderedDict()
        self._ghost_cap = 2 * (device_pages + host_pages)
        self._expiry: list[tuple[float, int, Block]] = []
        self._tick = itertools.count()
        self.quotas: dict[str, int] = {}
        self.pins: defaultdict[str, set[bytes]] = defaultdict(set)
        self.mode = mode
        self.duel = Duel(device_pages + host_pages, protected, stale_s=stale_s) if mode == "adaptive" else None
        self.stale_s = stale_s
        self.now = 0.0  # the store's clock at its last operation (``newest`` ages by it)
        self.held: set[Block] = set()  # blocks queued requests will match: evicted last
        # Per-namespace sub-orders of both segments (the recency one is ``_ns_lru``) and
        # each idle block's position in its segment and in recency (appends only, so a
        # position orders blocks as the segment does): a shares filter merges them.
        self._ns_probation: dict[Tier, defaultdict[str, OrderedDict[Block, None]]] = {
            DEVICE: defaultdict(OrderedDict), HOST: defaultdict(OrderedDict)}
        self._ns_protected: dict[Tier, defaultdict[str, OrderedDict[Block, None]]] = {
            DEVICE: defaultdict(OrderedDict), HOST: defaultdict(OrderedDict)}
        self._stamp: dict[Block, int] = {}
        self._rstamp: dict[Block, int] = {}
        self._stamps = itertools.count()
        # ``newest``: release groups nondecreasing along probation (so a run is a group);
        # the non-stale probation blocks by position (lazy), for the first fresh one.
        self._top_group: dict[Tier, int] = {DEVICE: -1, HOST: -1}
        self._monotone: dict[Tier, bool] = {DEVICE: True, HOST: True}
        self._fresh_heap: dict[Tier, list[tuple[int, Block]]] = {DEVICE: [], HOST: []}
        self._horizon = -math.inf  # the latest ``newest`` horizon the heaps were pruned to
        self.inspected = 0  # blocks looked at while choosing victims (work, for tests)

    @property
    def order(self) -> str:
        """The eviction order followed now."""
        return self.duel.choice if self.duel is not None else self.mode

    def observe(self, keys: list[tuple[bytes, float]], now: float) -> None:
        """A prompt's block hashes and TTLs, as matched: the duel's sample."""
        if self.duel is not None:
            self.duel.observe(keys, now)

    def hold(self, blocks: set[Block]) -> None:
        """The blocks queued requests will match (replaces the previous set)."""
        self.held = blocks

    # -- LRU ---------------------------------------------------------------------------
    def add(self, block: Block, group: int | None = None) -> None:
        """``block`` became evictable on its tier: most recently used from now."""
        if block.pinned:
            return
        self._readmit(block)
        tier = block.tier
        self._group[block] = next(self._groups) if group is None else group
        self._since[block] = self.now
        if block.hits:
            protected = self._protected[tier]
            protected[block] = None
            self._ns_protected[tier][block.namespace][block] = None
            self._stamp[block] = next(self._stamps)
            while len(protected) > self._protected_cap[tier]:
                aged, _ = protected.popitem(last=False)
                self._unlink_ns(self._ns_protected[tier], aged)
                self._group[aged] = next(self._groups)
                self._to_probation(tier, aged)
        else:
            self._to_probation(tier, block)
        self._recency[tier][block] = None
        self._ns_lru[tier][block.namespace][block] = None
        self._rstamp[block] = next(self._stamps)

    def _to_probation(self, tier: Tier, block: Block) -> None:
        stamp = next(self._stamps)
        self._probation[tier][block] = None
        self._ns_probation[tier][block.namespace][block] = None
        self._stamp[block] = stamp
        group = self._group[block]
        if group < self._top_group[tier]:
            self._monotone[tier] = False
        self._top_group[tier] = max(group, self._top_group[tier])
        heap = self._fresh_heap[tier]
        heapq.heappush(heap, (stamp, block))
        if len(heap) > 2 * len(self._probation[tier]) + 64:  # entries of blocks gone
            self._rebuild_fresh(tier)

    def _rebuild_fresh(self, tier: Tier) -> None:
        self._fresh_heap[tier] = [(self._stamp[b], b) for b in self._probation[tier]
                                  if self._since[b] > self._horizon]
        heapq.heapify(self._fresh_heap[tier])

    @staticmethod
    def _unlink_ns(orders: defaultdict[str, OrderedDict[Block, None]], block: Block) -> None:
        order = orders[block.namespace]
        del order[block]
        if not order:
            del orders[block.namespace]

    def add_released(self, blocks: list[Block]) -> None:
        """Blocks released together (one group): deepest first, so the prefix is evicted last."""
        for block in sorted(blocks, key=lambda b: b.depth):  # parents decide before children
            self._readmit(block)
        group = next(self._groups)
        for block in sorted(blocks, key=lambda b: -b.depth):
            self.add(block, group)

    def _readmit(self, block: Block) -> None:
        """A fresh block whose hash is a ghost counts as reused (once its parent does too).

        The parent condition keeps a reused child from outranking its prefix, so the
        prefix is still never evicted before its extensions.
        """
        if block.hits or block.hash not in self._ghosts:
            return
        if block.parent is None or block.parent.hits or block.parent.pinned:
            del self._ghosts[block.hash]
            block.hits = 1

    def remove(self, block: Block) -> None:
        """``block`` is in use again, pinned, moved or dropped: no longer a candidate."""
        if not block.alive and self._ghost_cap:  # dropped: remember that it existed
            self._ghosts[block.hash] = None
            self._ghosts.move_to_end(block.hash)
            if len(self._ghosts) > self._ghost_cap:
                self._ghosts.popitem(last=False)
        tier = block.tier
        on_probation = block in self._probation[tier]
        order = self._probation[tier] if on_probation else self._protected[tier]
        if block in order:
            del order[block]
            self._unlink_ns((self._ns_probation if on_probation else self._ns_protected)[tier],
                            block)
            del self._stamp[block]
            del self._rstamp[block]
            if not self._probation[tier]:  # an empty order is in order again
                self._monotone[tier] = True
                self._top_group[tier] = -1
                self._fresh_heap[tier] = []
            del self._recency[tier][block]
            del self._group[block]
            del self._since[block]
            ns_order = self._ns_lru[block.tier][block.namespace]
            del ns_order[block]
            if not ns_order:
                del self._ns_lru[block.tier][block.namespace]

    def num_evictable(self, tier: Tier) -> int:
        return len(self._probation[tier]) + len(self._protected[tier])

    def victim(
        self, tier: Tier, allowed: Callable[[Block], bool] | None = None, owner: str | None = None,
    ) -> Block | None:
        """The next idle block of ``tier`` to go (not removed): LRU of probation, then protected.

        ``allowed`` (guaranteed shares, ``shares.Shares.may_evict``) skips blocks it refuses.
        """
        found = self.victims(tier, 1, allowed, owner)
        return found[0] if found else None

    def victims(
        self, tier: Tier, n: int, allowed: Callable[[Block], bool] | None = None,
        owner: str | None = None,
    ) -> list[Block]:
        """The next ``n`` idle blocks of ``tier`` to go, in order (not removed; fewer if
        there are not enough that ``allowed`` accepts). Held blocks (``hold``) come after
        all others, in the same order; with a shares filter, only those of ``owner`` (the
        allocating namespace): a hold never shields a block beyond its namespace's share."""
        out: list[Block] = []
        if n <= 0:
            return out
        if isinstance(allowed, EvictFilter) and owner is not None and owner == allowed.namespace:
            found = self._victims_by_budget(tier, n, allowed, owner)
            if found is not None:
                return found
        held: list[Block] = []
        defer_all = allowed is None or owner is None
        for block in self._ordered(tier):
            self.inspected += 1
            if block in self.held and (defer_all or block.namespace == owner):
                held.append(block)
            elif allowed is None or allowed(block):
                out.append(block)
                if len(out) == n:
                    return out
        for block in held:
            if allowed is None or allowed(block):
                out.append(block)
                if len(out) == n:
                    break
        return out

    def _victims_by_budget(
        self, tier: Tier, n: int, allowed: EvictFilter, owner: str,
    ) -> list[Block] | None:
        """``victims`` with a shares filter, by merging the sub-orders of the namespaces it
        takes blocks from (the same blocks in the same order as the scan; None where the
        order followed now cannot be split, then the scan answers)."""
        order = ORDERS[self.order]
        fresh: int | None = None
        if order.by_group:
            if not self._monotone[tier]:
                return None
            fresh = self._first_fresh(tier, self.now - self.stale_s)
        heap: list[tuple[Key, int, Block, Iterator[tuple[Key, Block]]]] = []
        left: list[int | None] = []
        for ns in self._ns_lru[tier]:
            budget = allowed.budget(ns)
            if budget == 0:
                continue
            stream = self._ns_ordered(tier, ns, order, fresh)
            first = next(stream, None)
            if first is not None:
                heap.append((first[0], len(left), first[1], stream))
                left.append(budget)
        heapq.heapify(heap)
        out: list[Block] = []
        deferred: list[Block] = []
        while heap:
            _, i, block, stream = heap[0]
            self.inspected += 1
            if block in self.held and block.namespace == owner:
                deferred.append(block)
            elif allowed(block):
                out.append(block)
                if len(out) == n:
                    return out
                budget = left[i]
                if budget is not None:
                    left[i] = budget - 1
                    if budget == 1:  # this namespace is done for this allocation
                        heapq.heappop(heap)
                        continue
            item = next(stream, None)
            if item is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (item[0], i, item[1], stream))
        for block in deferred:  # all the owner's, in order: it may take them all
            out.append(block)
            if len(out) == n:
                break
        return out

    def _ns_ordered(
        self, tier: Tier, ns: str, order: EvictionOrder, fresh: int | None,
    ) -> Iterator[tuple[Key, Block]]:
        """The namespace's idle blocks of ``tier`` with their place in ``_ordered(tier)``,
        first to go first; ``fresh``: the position of the first non-stale probation block
        (``newest``)."""
        segments = Segments(self._ns_lru[tier].get(ns, ()), self._ns_probation[tier].get(ns, ()),
                            self._ns_protected[tier].get(ns, ()), self._group, self._since)
        return order.keyed(segments, self._stamp, self._rstamp, fresh)

    def _first_fresh(self, tier: Tier, horizon: float) -> int | None:
        """Position of the first probation block idle since after ``horizon`` (None: all
        are stale). Heap entries of stale blocks are dropped for good, so a horizon that
        goes back (a clock set back) rebuilds the heaps first."""
        if horizon < self._horizon:
            self._horizon = horizon
            for t in (DEVICE, HOST):
                self._rebuild_fresh(t)
        self._horizon = horizon
        heap = self._fresh_heap[tier]
        probation = self._probation[tier]
        while heap:
            stamp, block = heap[0]
            if block in probation and self._stamp[block] == stamp and self._since[block] > horizon:
                return stamp
            heapq.heappop(heap)
        return None

    def _ordered(self, tier: Tier) -> Iterator[Block]:
        """Idle blocks of ``tier``, first to go first, in the order followed now."""
        segments = Segments(self._recency[tier], self._probation[tier], self._protected[tier],
                            self._group, self._since)
        return ORDERS[self.order].victims(segments, self.now - self.stale_s)

    def namespace_victim(self, namespace: str) -> Block | None:
        """The namespace's own coldest block: host tier first, then device."""
        for tier in (HOST, DEVICE):
            order = self._ns_lru[tier].get(namespace)
            if order:
                return next(iter(order))
        return None

    # -- TTL ---------------------------------------------------------------------------
    def schedule_expiry(self, block: Block) -> None:
        if not block.pinned:
            heapq.heappush(self._expiry, (block.expires_at, next(self._tick), block))

    def pop_expired(self, now: float) -> list[Block]:
        """Idle, unpinned blocks whose expiry is due (each once)."""
        due: list[Block] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires_at, _, block = heapq.heappop(heap)
            if is_expired(block, now) and block.expires_at == expires_at:
                due.append(block)
        return due

    # -- quota and pins ------------------------------------------------------------------
    def over_quota(self, namespace: str, held_bytes: int) -> bool:
        quota = self.quotas.get(namespace)
        return quota is not None and held_bytes > quota

    def is_pinned(self, namespace: str, block_hash: bytes) -> bool:
        pins = self.pins.get(namespace)
        return pins is not None and block_hash in pins


def is_expired(block: Block, now: float) -> bool:
    """Expired = idle past its expiry; a block in use or pinned never is."""
    return block.alive and block.ref_count == 0 and not block.pinned and block.expires_at <= now
