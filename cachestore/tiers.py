"""Moving pages between the tiers: demotion on device eviction, promotion on a hit.

``TierMoves`` is handed everything it works with: the two pools, the index (which block
lives where; ``PrefixIndex.move`` and ``drop``), the policy (who goes next) and the
counters it adds to. Both directions move whole pages through ``pool.copy_pages`` in one
batched call each; the bookkeeping changes only after the copy is queued.
"""

from __future__ import annotations

from cachestore.block import DEVICE, HOST, Block
from cachestore.counters import CacheCounters
from cachestore.index import PrefixIndex
from cachestore.policy import EvictionPolicy
from cachestore.pool import PagePool, copy_pages


class TierMoves:
    def __init__(
        self, device: PagePool, host: PagePool, index: PrefixIndex, policy: EvictionPolicy,
        counters: CacheCounters,
    ) -> None:
        self.device = device
        self.host = host
        self.index = index
        self.policy = policy
        self.counters = counters

    def reserve_device(self, need: int) -> bool:
        """Make ``need`` device pages free by evicting idle blocks (demoting where possible)."""
        short = need - self.device.num_free
        if short <= 0:
            return True
        if short > self.policy.num_evictable(DEVICE):
            return False
        victims = []
        for _ in range(short):
            victim = self.policy.victim(DEVICE)
            assert victim is not None
            self.policy.remove(victim)
            victims.append(victim)
        self.demote(victims)
        return True

    def demote(self, victims: list[Block]) -> None:
        """Move victims to the host (making room there by its own LRU), else drop them."""
        for _ in range(max(0, len(victims) - self.host.num_free)):
            host_victim = self.policy.victim(HOST)
            if host_victim is None:
                break
            self.counters.evictions.lru += len(self.index.drop(host_victim))
        alive = [v for v in victims if v.alive]
        spill = max(0, len(alive) - self.host.num_free)
        for v in alive[:spill]:  # the coldest go (children before parents)
            self.counters.evictions.lru += len(self.index.drop(v))
        moving = [v for v in alive[spill:] if v.alive]
        host_pages = [self.host.take() for _ in moving]
        copy_pages(self.device.tensor, self.host.tensor, [v.page for v in moving], host_pages)
        for v, host_page in zip(moving, host_pages, strict=True):
            self.index.move(v, HOST, host_page)
            self.policy.add(v)
        self.counters.demotions.add(len(moving), self.device.page_bytes)

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
        self.reserve_device(len(on_host))
        device_pages = [self.device.take() for _ in on_host]
        host_pages = [matched[i].page for i in on_host]
        copy_pages(self.host.tensor, self.device.tensor, host_pages, device_pages)
        for i, page in zip(on_host, device_pages, strict=True):
            self.index.move(matched[i], DEVICE, page)
        self.counters.promotions.add(len(on_host), self.device.page_bytes)
        return matched, len(on_host)
