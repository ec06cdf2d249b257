"""Moving pages between the tiers: demotion on device eviction, promotion on a hit.

``TierMoves`` is handed everything it works with: the two pools, the index (which block
lives where; ``PrefixIndex.move`` and ``drop``), the policy (who goes next) and the
counters it adds to. Both directions move whole pages through ``pool.move_pages`` in one
batched call each; the bookkeeping changes only after the copy is queued.
"""

from __future__ import annotations

from collections.abc import Callable

from kvgate.cachestore.block import DEVICE, HOST, Block
from kvgate.cachestore.counters import CacheCounters
from kvgate.cachestore.index import PrefixIndex
from kvgate.cachestore.policy import EvictionPolicy
from kvgate.cachestore.pool import PagePool, move_pages
from kvgate.cachestore.shares import Shares


class TierMoves:
    def __init__(
        self, device: PagePool, host: PagePool, index: PrefixIndex, policy: EvictionPolicy,
        counters: CacheCounters, shares: Shares | None = None,
    ) -> None:
        self.device = device
        self.host = host
        self.index = index
        self.policy = policy
        self.counters = counters
        self.shares = shares if shares is not None else Shares(device, host, False, 0.0)
        # the remote tier's write-back of demoted blocks (``remote_link``); None: no tier
        self.on_demoted: Callable[[list[Block]], None] | None = None

    def reserve_device(self, need: int, namespace: str | None = None) -> bool:
        """Make ``need`` device pages free for ``namespace`` by evicting idle blocks
        (demoting where possible); with shares, also the free pages other active
        namespaces' shares still lack, evicting only what ``namespace`` may evict."""
        short = need - self.device.num_free
        if short > self.policy.num_evictable(DEVICE):
            return False
        reserve = 0 if namespace is None else self.shares.reserved_for_others(namespace, DEVICE)
        want = short + reserve
        victims = self.policy.victims(DEVICE, want, self.shares.may_evict(namespace, DEVICE),
                                      namespace)
        for victim in victims:
            self.policy.remove(victim)
        # reserved free pages this allocation takes because nothing it may evict is left
        self.shares.fallbacks += min(reserve, max(0, want - len(victims)))
        if len(victims) < short:  # every candidate left is protected: plain order
            forced = self.policy.victims(DEVICE, short - len(victims))
            for victim in forced:
                self.policy.remove(victim)
            self.shares.fallbacks += sum(b.namespace != namespace for b in forced)
            victims += forced
        if not victims:
            return True
        self.shares.count_evicted(victims, DEVICE, namespace)
        self.demote(victims, namespace)
        return True

    def demote(self, victims: list[Block], namespace: str | None = None) -> None:
        """Move victims to the host (making room there by its own LRU), else drop them.

        While any namespace is protected (``Shares.protecting``), each victim's host page is
        allocated for the victim's own namespace, as any allocation is (``_demote_by_shares``).
        """
        if namespace is not None and self.shares.protecting():
            self._demote_by_shares(victims)
            return
        for _ in range(max(0, len(victims) - self.host.num_free)):
            host_victim = self.policy.victim(HOST)
            if host_victim is None:
                break
            dropped = self.index.drop(host_victim)
            self.shares.count_evicted(dropped, HOST, namespace)
            self.counters.evictions.lru += len(dropped)
        alive = [v for v in victims if v.alive]
        spill = max(0, len(alive) - self.host.num_free)
        for v in alive[:spill]:  # the coldest go (children before parents)
            self.counters.evictions.lru += len(self.index.drop(v))
        self._move_to_host([(v, self.host.take(v.namespace)) for v in alive[spill:] if v.alive])

    def _demote_by_shares(self, victims: list[Block]) -> None:
        """Victim by victim: room on the host for its namespace, among the host blocks that
        namespace may evict and the free pages no other share lacks; else it is dropped
        (never a protected host block: the host tier has no fallback)."""
        moving: list[tuple[Block, int]] = []
        for v in victims:
            owner = v.namespace
            while v.alive and self.host.num_free <= self.shares.reserved_for_others(owner, HOST):
                host_victim = self.policy.victim(HOST, self.shares.may_evict(owner, HOST), owner)
                if host_victim is None:
                    break
                dropped = self.index.drop(host_victim)
                self.shares.count_evicted(dropped, HOST, owner)
                self.counters.evictions.lru += len(dropped)
            if not v.alive:  # its parent was on the host and went
                continue
            if self.host.num_free > self.shares.reserved_for_others(owner, HOST):
                moving.append((v, self.host.take(owner)))
            else:
                self.counters.evictions.lru += len(self.index.drop(v))
        for v, page in moving:
            if not v.alive:  # went with a host ancestor dropped for a later victim
                self.host.give_back(page)
        self._move_to_host([(v, page) for v, page in moving if v.alive])

    def _move_to_host(self, moving: list[tuple[Block, int]]) -> None:
        """Copy the blocks' device pages to the host pages taken for them, in one batch."""
        move_pages(self.device, self.host, [v.page for v, _ in moving],
                   [page for _, page in moving])
        for v, host_page in moving:
            self.index.move(v, HOST, host_page)
            self.policy.add(v)
        self.counters.demotions.add(len(moving), self.host.page_bytes)
        if self.on_demoted is not None and moving:
            self.on_demoted([v for v, _ in moving])

    def promote(self, matched: list[Block]) -> tuple[list[Block], int]:
        """Copy matched host blocks into device pages; cut the match where room runs out.

        The blocks cut off lose the reference the match gave them. → (the blocks kept,
        how many of them were promoted).
        """
        on_host = [i for i, b in enumerate(matched) if b.tier == HOST]
        if not on_host:
            return matched, 0
        room = self.device.num_free + self.policy.num_evictable(DEVICE)
        if len(on_host) > room:  # keep the prefix whose promotions fit
            cut = on_host[room]
            self.index.unref(matched[cut:])
            matched, on_host = matched[:cut], on_host[:room]
            if not on_host:  # no device room at all: the match ends before the host blocks
                return matched, 0
        self.reserve_device(len(on_host), matched[0].namespace)
        device_pages = [self.device.take(matched[i].namespace) for i in on_host]
        host_pages = [matched[i].page for i in on_host]
        move_pages(self.host, self.device, host_pages, device_pages)
        for i, page in zip(on_host, device_pages, strict=True):
            self.index.move(matched[i], DEVICE, page)
        self.counters.promotions.add(len(on_host), self.host.page_bytes)
        return matched, len(on_host)
