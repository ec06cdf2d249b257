"""Guaranteed shares: each active namespace keeps a protected part of each tier.

In the spirit of cgroups' ``memory.low``, plus a reservation on the device tier, so that
one tenant's traffic cannot evict, or learn from evicting, another tenant's blocks:

- Active: a namespace that sent a request (``match`` or ``allocate``) within the last
  ``window_s`` seconds of the store's clock (by default the store's default TTL: a
  namespace idle longer than that has, unless it asked for longer TTLs, nothing left
  cached to protect). An inactive namespace has no share: its blocks are evictable by
  anyone, in plain policy order.
- Share of a tier, in pages: an explicit share (``set_explicit``, bytes, the same on each tier,
  capped at the tier) if the namespace has one, else a fair share: the tier's pages not
  explicitly given to active namespaces, divided by the number of active namespaces
  without an explicit share.
- Usage: pages a namespace holds on a tier (``PagePool.held``): its indexed blocks there
  and, on the device, the pages its running sequences hold.
- Protection: a block whose namespace holds no more than its share is evicted only for that
  namespace's own allocations. Another namespace's allocation takes, in policy order, its
  own blocks and blocks of namespaces over their share. Only when no such block is left
  does it fall back to plain policy order; each block so taken is counted (``fallbacks``),
  as is each reserved free page (below) an allocation takes for want of anything to evict.
- Reservation (device): a namespace's allocation leaves free the device pages the other
  active namespaces' shares still lack (share minus usage); it evicts for them instead.
  Without this a tenant that filled the pool would lose its over-share blocks to the
  victim's writes and count them: memory.low alone protects the victim's blocks, not the
  fact that it wrote.
- Host tier: protection only, no reservation. A demotion that finds no host block it may
  evict drops the demoted block instead (as when the host is full of active blocks).
- ``evicted_by_others``: per namespace and tier, blocks that left that tier (demoted or
  dropped) for another namespace's allocation, over share or not.

With one namespace nothing changes: every candidate is its own. With ``enabled=False`` no
namespace is protected (plain policy order), but usage and ``evicted_by_others`` are kept.
"""

from __future__ import annotations

from kvgate.cachestore.block import DEVICE, HOST, TIERS, Block, Tier
from kvgate.cachestore.pool import PagePool


class Shares:
    def __init__(self, device: PagePool, host: PagePool, enabled: bool, window_s: float) -> None:
        self.enabled = enabled
        self.window_s = float(window_s)
        self.pools: dict[Tier, PagePool] = {DEVICE: device, HOST: host}
        self.page_bytes = device.page_bytes
        self.explicit: dict[str, int] = {}  # namespace -> share in bytes (each tier)
        self._last_seen: dict[str, float] = {}  # namespace -> last request, oldest first
        self.evicted_by_others: dict[Tier, dict[str, int]] = {DEVICE: {}, HOST: {}}
        self.fallbacks = 0  # protected blocks evicted / reserved pages taken: nothing else could

    # -- activity ---------------------------------------------------------------------------
    def touch(self, namespace: str, now: float) -> None:
        """``namespace`` sent a request at ``now``."""
        self._last_seen.pop(namespace, None)
        self._last_seen[namespace] = now
        self.prune(now)

    def prune(self, now: float) -> None:
        """Forget namespaces idle for longer than the window."""
        horizon = now - self.window_s
        while self._last_seen:
            ns, seen = next(iter(self._last_seen.items()))
            if seen >= horizon:
                break
            del self._last_seen[ns]

    def active(self) -> list[str]:
        return list(self._last_seen)

    # -- shares and usage ---------------------------------------------------------------------
    def held(self, namespace: str, tier: Tier) -> int:
        return self.pools[tier].held.get(namespace, 0)

    def is_active(self, namespace: str) -> bool:
        return namespace in self._last_seen

    def share_pages(self, namespace: str, tier: Tier, fair: int | None = None) -> int:
        """The namespace's protected pages of ``tier`` now (0 when inactive or disabled);
        ``fair`` is ``fair_pages(tier)`` when the caller has it."""
        if not self.enabled or namespace not in self._last_seen:
            return 0
        explicit = self.explicit.get(namespace)
        if explicit is not None:
            return min(self.pools[tier].num_pages, explicit // self.page_bytes)
        return self.fair_pages(tier) if fair is None else fair

    def fair_pages(self, tier: Tier) -> int:
        """The share of an active namespace without an explicit one."""
        capacity = self.pools[tier].num_pages
        given = 0
        fair_count = 0
        for ns in self._last_seen:
            own = self.explicit.get(ns)
            if own is None:
                fair_count += 1
            else:
                given += min(capacity, own // self.page_bytes)
        return max(0, capacity - given) // max(1, fair_count)

    def reserved_for_others(self, namespace: str, tier: Tier) -> int:
        """Pages of ``tier`` the other active namespaces' shares still lack."""
        if not self.enabled:
            return 0
        fair = self.fair_pages(tier)
        return sum(max(0, self.share_pages(ns, tier, fair) - self.held(ns, tier))
                   for ns in self._last_seen if ns != namespace)

    def may_evict(self, namespace: str | None, tier: Tier) -> EvictFilter | None:
        """A filter for the policy's victims of one allocation by ``namespace`` on ``tier``:
        its own blocks, and blocks of namespaces over their share. Accepting a block counts
        it against its namespace, so one allocation never takes a namespace below its share.
        None (every block may go) when shares are off or the allocation has no namespace.
        """
        if not self.enabled or namespace is None:
            return None
        return EvictFilter(self, namespace, tier)

    def set_explicit(self, namespace: str, share_bytes: int | None) -> None:
        if share_bytes is None:
            self.explicit.pop(namespace, None)
        else:
            self.explicit[namespace] = max(0, int(share_bytes))

    def count_evicted(self, blocks: list[Block], tier: Tier, namespace: str | None) -> None:
        """``blocks`` left ``tier`` for an allocation by ``namespace``."""
        if namespace is None:
            return
        counts = self.evicted_by_others[tier]
        for block in blocks:
            if block.namespace != namespace:
                counts[block.namespace] = counts.get(block.namespace, 0) + 1

    def namespaces(self) -> set[str]:
        names = set(self._last_seen)
        for tier in TIERS:
            names.update(ns for ns in self.pools[tier].held if ns)
            names.update(self.evicted_by_others[tier])
        return names


class EvictFilter:
    """One allocation's filter (``Shares.may_evict``): called on a candidate block, it says
    whether the allocation may take it and, if so, counts it. ``budget`` says the same per
    namespace ahead of time, so the policy can skip a whole namespace without looking at
    its blocks (``EvictionPolicy.victims``)."""

    def __init__(self, shares: Shares, namespace: str, tier: Tier) -> None:
        self.namespace = namespace
        self.tier = tier
        self._shares = shares
        self._fair = shares.fair_pages(tier)
        self._share: dict[str, int] = {}
        self._taken: dict[str, int] = {}

    def budget(self, ns: str) -> int | None:
        """How many more of ``ns``'s blocks this allocation may take (None: any number)."""
        if ns == self.namespace:
            return None
        share = self._share.get(ns)
        if share is None:
            share = self._share[ns] = self._shares.share_pages(ns, self.tier, self._fair)
        return max(0, self._shares.held(ns, self.tier) - self._taken.get(ns, 0) - share)

    def __call__(self, block: Block) -> bool:
        ns = block.namespace
        if self.budget(ns) == 0:
            return False
        self._taken[ns] = self._taken.get(ns, 0) + 1
        return True
