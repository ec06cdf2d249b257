"""Moving pages between the tiers: demotion on device eviction, promotion on a hit.

Both move whole pages through ``pool.copy_pages`` in one batched call each; the bookkeeping
(which block lives where, the counters) changes only after the copy is queued.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachestore.block import DEVICE, HOST, Block
from cachestore.pool import copy_pages

if TYPE_CHECKING:
    from cachestore.store import CacheStore


def reserve_device(store: CacheStore, need: int) -> bool:
    """Make ``need`` device pages free by evicting idle blocks (demoting where possible)."""
    short = need - store.device.num_free
    if short <= 0:
        return True
    if short > store.policy.num_evictable(DEVICE):
        return False
    victims = []
    for _ in range(short):
        victim = store.policy.victim(DEVICE)
        assert victim is not None
        store.policy.remove(victim)
        victims.append(victim)
    demote(store, victims)
    return True


def demote(store: CacheStore, victims: list[Block]) -> None:
    """Move victims to the host (making room there by its own LRU), else drop them."""
    for _ in range(max(0, len(victims) - store.host.num_free)):
        host_victim = store.policy.victim(HOST)
        if host_victim is None:
            break
        store._drop(host_victim, "lru")
    alive = [v for v in victims if v.alive]
    spill = max(0, len(alive) - store.host.num_free)
    for v in alive[:spill]:  # the coldest go (children before parents)
        store._drop(v, "lru")
    moving = [v for v in alive[spill:] if v.alive]
    host_pages = [store.host.take() for _ in moving]
    copy_pages(store.device_pool, store.host_pool, [v.page for v in moving], host_pages)
    for v, host_page in zip(moving, host_pages, strict=True):
        store.device.give_back(v.page)
        store._idle_device -= 1
        v.tier, v.page = HOST, host_page
        store.policy.add(v)
    store._demotions[0] += len(moving)
    store._demotions[1] += len(moving) * store.layout.page_bytes


def promote(store: CacheStore, matched: list[Block]) -> tuple[list[Block], int]:
    """Copy matched host blocks into device pages; cut the match where room runs out."""
    on_host = [i for i, b in enumerate(matched) if b.tier == HOST]
    if not on_host:
        return matched, 0
    room = store.device.num_free + store.policy.num_evictable(DEVICE)
    if len(on_host) > room:  # keep the prefix whose promotions fit
        cut = on_host[room]
        for block in matched[cut:]:
            _unref_unused(store, block)
        matched, on_host = matched[:cut], on_host[:room]
    reserve_device(store, len(on_host))
    device_pages = [store.device.take() for _ in on_host]
    host_pages = [matched[i].page for i in on_host]
    copy_pages(store.host_pool, store.device_pool, host_pages, device_pages)
    for i, page in zip(on_host, device_pages, strict=True):
        matched[i].tier, matched[i].page = DEVICE, page
    for page in host_pages:
        store.host.give_back(page)
    store._promotions[0] += len(on_host)
    store._promotions[1] += len(on_host) * store.layout.page_bytes
    return matched, len(on_host)


def _unref_unused(store: CacheStore, block: Block) -> None:
    """Undo a match reference that never reached the sequence."""
    block.ref_count -= 1
    if block.ref_count == 0:
        if block.tier == DEVICE:
            store._idle_device += 1
        store.policy.add(block)
        store.policy.schedule_expiry(block)
