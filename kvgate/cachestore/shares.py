"""Reserved cache capacity: a namespace with a reservation keeps that part of each tier.

By default nothing is reserved: one eviction order over all namespaces, quotas the only
per-namespace bound. A *reservation* (bytes per tier) protects its namespace's blocks, as
cgroups' ``memory.low`` does; ``fair=True`` also gives every *active* namespace (one that
sent a request within ``window_s``) without a reservation an equal part of what is not
reserved. An allocation evicts only its own namespace's blocks and those of namespaces over
their share (``EvictFilter``), and falls back to plain order only when none is left
(``fallbacks``); on the device it also leaves free the pages other active namespaces'
shares still lack. The host tier gets protection only. With no reservation and ``fair``
off the filter is never built. docs/architecture.md (Reservations and fair shares) defines
share and usage and says what another tenant can still observe.
"""

from __future__ import annotations

from kvgate.cachestore.block import DEVICE, HOST, TIERS, Block, Tier
from kvgate.cachestore.pool import PagePool


class Shares:
    def __init__(self, device: PagePool, host: PagePool, fair: bool, window_s: float) -> None:
        self.fair = fair
        self.window_s = float(window_s)
        self.pools: dict[Tier, PagePool] = {DEVICE: device, HOST: host}
        self.reserved: dict[str, dict[Tier, int]] = {}  # namespace -> tier -> bytes
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

    @property
    def enabled(self) -> bool:
        """Whether any namespace can be protected now: fair shares, or a reservation."""
        return self.fair or bool(self.reserved)

    def protecting(self) -> bool:
        """Whether an allocation must look at whose blocks it takes: a reservation exists,
        or fair shares with more than one active namespace."""
        return bool(self.reserved) or (self.fair and len(self._last_seen) > 1)

    # -- shares and usage ---------------------------------------------------------------------
    def held(self, namespace: str, tier: Tier) -> int:
        return self.pools[tier].held.get(namespace, 0)

    def is_active(self, namespace: str) -> bool:
        return namespace in self._last_seen

    def reserved_pages(self, namespace: str, tier: Tier) -> int | None:
        """The namespace's reservation on ``tier`` in pages (capped at the tier), or None."""
        own = self.reserved.get(namespace)
        if own is None or tier not in own:
            return None
        return min(self.pools[tier].num_pages, own[tier] // self.pools[tier].page_bytes)

    def share_pages(self, namespace: str, tier: Tier, fair: int | None = None) -> int:
        """The namespace's protected pages of ``tier`` now: its reservation, else its fair
        share while active (with ``fair`` on), else 0; ``fair`` is ``fair_pages(tier)``
        when the caller has it."""
        own = self.reserved_pages(namespace, tier)
        if own is not None:
            return own
        if not self.fair or namespace not in self._last_seen:
            return 0
        return self.fair_pages(tier) if fair is None else fair

    def fair_pages(self, tier: Tier) -> int:
        """The share of an active namespace without a reservation (0 with ``fair`` off)."""
        if not self.fair:
            return 0
        capacity = self.pools[tier].num_pages
        given = sum(self.reserved_pages(ns, tier) or 0 for ns in self.reserved)
        fair_count = sum(1 for ns in self._last_seen if self.reserved_pages(ns, tier) is None)
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
        None (every block may go) when nothing is protected or the allocation has no
        namespace.
        """
        if not self.enabled or namespace is None:
            return None
        return EvictFilter(self, namespace, tier)

    def set_reservation(self, namespace: str, device_bytes: int | None,
                        host_bytes: int | None) -> None:
        """The namespace's reserved bytes per tier; None on a tier: none there."""
        given: tuple[tuple[Tier, int | None], ...] = ((DEVICE, device_bytes), (HOST, host_bytes))
        tiers: dict[Tier, int] = {t: max(0, int(b)) for t, b in given if b is not None}
        if tiers:
            self.reserved[namespace] = tiers
        else:
            self.reserved.pop(namespace, None)

    def reservations(self) -> dict[str, dict[Tier, int]]:
        """Reserved bytes per namespace and tier (capped at the tier), for billing."""
        return {ns: {t: (self.reserved_pages(ns, t) or 0) * self.pools[t].page_bytes for t in own}
                for ns, own in self.reserved.items()}

    def count_evicted(self, blocks: list[Block], tier: Tier, namespace: str | None) -> None:
        """``blocks`` left ``tier`` for an allocation by ``namespace``."""
        if namespace is None:
            return
        counts = self.evicted_by_others[tier]
        for block in blocks:
            if block.namespace != namespace:
                counts[block.namespace] = counts.get(block.namespace, 0) + 1

    def namespaces(self) -> set[str]:
        names = set(self._last_seen) | set(self.reserved)
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
