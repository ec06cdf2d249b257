"""What to evict: segmented LRU with a ghost list over idle blocks per tier, deepest first; TTL; quotas; pins.

The policy never touches pages; it orders blocks and answers "who goes next". The index
tells it when a block turns idle or active again (``PrefixIndex.ref``/``unref``); the
store and the tier moves ask it for victims and do the moving.

- LRU: a block enters its tier's order when it becomes idle (refcount 0) or is demoted.
  A released chain is added deepest block first (``PrefixIndex.unref``), so among blocks
  last used at the same moment the extension goes before its prefix; a hit on a child
  always touches its parent too, so a prefix never ages faster than its extensions.
- Segmented: the order is split in two, as in SLRU. Blocks never reused since they were
  written (one-off documents, fresh conversation tails) are evicted before blocks that
  were reused (system prompts, conversation prefixes); the reused segment is capped at
  three quarters of the tier, its overflow ages back into the first.
- Ghosts: the hashes of the last dropped blocks (twice as many as both tiers hold pages,
  as ARC's two ghost lists) are remembered. A block written again while its hash is still a ghost was reused after all,
  only too late for the cache to see it: it enters the reused segment. Having been asked
  for twice is the best online sign of a third time; on the Mooncake conversation trace a
  block's chance of reuse within the TTL rises from 0.18 (first use) to 0.32 (second).
- ``bench/policy.py`` measures these choices against Belady's optimum; the table of what
  was tried (LFU-DA, GDSF by depth, ARC-style adaptive cap, scan admission) is in
  ``bench/results/policy.json``.
- TTL: a heap of expiry times with lazy invalidation (an entry is stale once the block
  was dropped, used again or given a new expiry).
- Quota: bytes a namespace holds in the index, both tiers, any state (pins included). A
  namespace over quota gives up its own idle blocks, host tier (colder) first.
- Pins: hashes per namespace; a pinned block is never in an eviction order and does not
  expire.
- Guaranteed shares (``shares.py``) filter the victims: an allocation may pass ``allowed``,
  and blocks it refuses (another namespace's, within its share) are skipped, not reordered.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, defaultdict
from collections.abc import Callable

from cachestore.block import DEVICE, HOST, Block, Tier


class EvictionPolicy:
    def __init__(self, device_pages: int = 0, host_pages: int = 0, protected: float = 0.75) -> None:
        # Segmented LRU: blocks never reused wait in ``_probation`` and go first; reused ones
        # (shared system prompts, conversation prefixes) sit in ``_protected``, capped at a
        # share of the tier so stale favourites age back into probation.
        self._probation: dict[Tier, OrderedDict[Block, None]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._protected: dict[Tier, OrderedDict[Block, None]] = {DEVICE: OrderedDict(), HOST: OrderedDict()}
        self._protected_cap: dict[Tier, int] = {
            DEVICE: int(device_pages * protected), HOST: int(host_pages * protected)}
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

    # -- LRU ---------------------------------------------------------------------------
    def add(self, block: Block) -> None:
        """``block`` became evictable on its tier: most recently used from now."""
        if block.pinned:
            return
        self._readmit(block)
        tier = block.tier
        if block.hits:
            protected = self._protected[tier]
            protected[block] = None
            while len(protected) > self._protected_cap[tier]:
                aged, _ = protected.popitem(last=False)
                self._probation[tier][aged] = None
        else:
            self._probation[tier][block] = None
        self._ns_lru[tier][block.namespace][block] = None

    def add_released(self, blocks: list[Block]) -> None:
        """Blocks released together: deepest first, so the prefix is evicted last."""
        for block in sorted(blocks, key=lambda b: b.depth):  # parents decide before children
            self._readmit(block)
        for block in sorted(blocks, key=lambda b: -b.depth):
            self.add(block)

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
        order = self._probation[tier] if block in self._probation[tier] else self._protected[tier]
        if block in order:
            del order[block]
            ns_order = self._ns_lru[block.tier][block.namespace]
            del ns_order[block]
            if not ns_order:
                del self._ns_lru[block.tier][block.namespace]

    def num_evictable(self, tier: Tier) -> int:
        return len(self._probation[tier]) + len(self._protected[tier])

    def victim(self, tier: Tier, allowed: Callable[[Block], bool] | None = None) -> Block | None:
        """The next idle block of ``tier`` to go (not removed): LRU of probation, then protected.

        ``allowed`` (guaranteed shares, ``shares.Shares.may_evict``) skips blocks it refuses.
        """
        found = self.victims(tier, 1, allowed)
        return found[0] if found else None

    def victims(
        self, tier: Tier, n: int, allowed: Callable[[Block], bool] | None = None
    ) -> list[Block]:
        """The next ``n`` idle blocks of ``tier`` to go, in order (not removed; fewer if
        there are not enough that ``allowed`` accepts)."""
        out: list[Block] = []
        if n <= 0:
            return out
        for order in (self._probation[tier], self._protected[tier]):
            for block in order:
                if allowed is None or allowed(block):
                    out.append(block)
                    if len(out) == n:
                        return out
        return out

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
