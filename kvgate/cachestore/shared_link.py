"""How the store uses the shared tier: what it writes, what it fetches, what it adopts.

- Write-through: blocks the store indexes (``commit``) are copied off their pages and
  queued for Valkey; blocks demoted to the host that were never taken (queue full) are
  queued again from their host pages. Both run on the engine thread under the store's
  lock and only copy and enqueue; ``SharedTier``'s thread does the network I/O.
- Fetch (``fetch``): off the engine thread. It hashes the prompt, counts the prefix this
  replica already holds (under the lock, briefly), and asks Valkey for the blocks after it.
- Adopt (``adopt``): on the engine thread, just before the request's ``match``: the
  fetched blocks that still follow the local prefix are copied into device pages and
  indexed as cached blocks. The ``match`` then finds them like any device hit, so they are
  billed as cache reads and never as writes, by the same code as every other hit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from kvgate.cachestore.block import DEVICE, HOST, Block, CacheSeq
from kvgate.cachestore.hashing import HashFn, TokenIds, chain_hashes, token_bytes
from kvgate.cachestore.index import PrefixIndex
from kvgate.cachestore.policy import EvictionPolicy, is_expired
from kvgate.cachestore.pool import PagePool
from kvgate.cachestore.shared_tier import CostModel, SharedFetch, SharedRecord, SharedTier
from kvgate.cachestore.tiers import TierMoves
from kvgate.kernels.layout import convert_pages


class LinkedStore(Protocol):
    """The parts of ``CacheStore`` the link works with (the store owns the link)."""

    device: PagePool
    host: PagePool
    index: PrefixIndex
    policy: EvictionPolicy
    tiers: TierMoves
    block_size: int
    default_ttl_s: float
    hash_fn: HashFn
    clock: Callable[[], float]

    def root_of(self, namespace: str) -> bytes: ...
    def local_prefix_blocks(self, namespace: str, hashes: list[bytes], data: bytes) -> int: ...
    def _enforce_quota(self, namespace: str, extra_blocks: int = 0) -> bool: ...


class SharedLink:
    def __init__(self, store: LinkedStore, tier: SharedTier, cost: CostModel | None) -> None:
        self.store = store
        self.tier = tier
        self.cost = cost

    # -- engine thread, under the store's lock ---------------------------------------------
    def write_through(self, blocks: list[Block]) -> None:
        """Queue the blocks not yet handed over; each page is copied to the CPU first."""
        blocks = [b for b in blocks if not b.shared and b.alive]
        room = self.tier.room()
        if len(blocks) > room:  # not even copied: offered again if demoted
            self.tier.count_dropped(len(blocks) - room)
            blocks = blocks[:room]
        if not blocks:
            return
        store = self.store
        pages: list[torch.Tensor] = []
        for tier_name, pool in ((DEVICE, store.device), (HOST, store.host)):
            group = [b for b in blocks if b.tier == tier_name]
            if group and tier_name == HOST and store.device.tensor.is_cuda:
                # a demotion's copy into these host pages runs on its own stream, which the
                # current stream waits on: the host may read them only once it is done
                torch.cuda.current_stream(store.device.tensor.device).synchronize()
            if group:  # the tier holds pages of the host's layout (``--offload-kv-dtype``)
                index = torch.tensor([b.page for b in group], device=pool.tensor.device)
                rows = convert_pages(pool.layout, store.host.layout,
                                     pool.tensor.index_select(0, index))
                pages.extend(rows.to("cpu").unbind(0))
        ordered = [b for t in (DEVICE, HOST) for b in blocks if b.tier == t]
        records = [
            SharedRecord(b.hash, b.parent.hash if b.parent is not None else store.root_of(b.namespace),
                         b.namespace, b.tokens, page, b.ttl_s)
            for b, page in zip(ordered, pages, strict=True)]
        taken = self.tier.put(records)
        for b in ordered[:taken]:
            b.shared = True

    def adopt(self, seq: CacheSeq, token_ids: TokenIds, fetched: SharedFetch) -> int:
        """Index the fetched blocks that extend the prompt's local prefix; → blocks adopted."""
        store = self.store
        now = store.clock()
        data = token_bytes(token_ids)
        hashes = chain_hashes(store.root_of(seq.namespace), data, store.block_size, store.hash_fn)
        local: list[Block] = []
        for block in store.index.walk(seq.namespace, hashes, data):
            if is_expired(block, now):
                break
            local.append(block)
        skip = len(local) - fetched.start
        if skip < 0:  # the local prefix shrank since the fetch: the blocks would not chain
            return 0
        wanted = []
        for pos, fb in enumerate(fetched.blocks[skip:], len(local)):
            if pos >= len(hashes) or fb.block_hash != hashes[pos] or \
                    fb.tokens != store.index.tokens_of(data, pos) or fb.block_hash in store.index:
                break
            wanted.append((pos, fb))
        if not wanted:
            return 0
        for block in local:  # hold the prefix: making room must not evict it
            store.index.ref(block)
        adopted: list[Block] = []
        try:
            parent = local[-1] if local else None
            for pos, fb in wanted:
                if not store._enforce_quota(seq.namespace, extra_blocks=1):
                    break
                if not store.tiers.reserve_device(1, seq.namespace):
                    break
                page = store.device.take(seq.namespace)
                store.device.tensor[page].copy_(
                    convert_pages(store.host.layout, store.device.layout, fb.page[None])[0])
                ttl_s = seq.ttl_for_block(pos, store.block_size, store.default_ttl_s)
                pinned = (parent is None or parent.pinned) and store.policy.is_pinned(
                    seq.namespace, fb.block_hash)
                block = store.index.insert(fb.block_hash, parent, seq.namespace, fb.tokens, page,
                                           ttl_s, pinned)
                block.shared = block.fetched = True
                adopted.append(block)
                parent = block
        finally:
            store.index.unref(adopted, now=now)
            store.index.unref(local)
        return len(adopted)

    # -- any thread but the engine's ---------------------------------------------------------
    def fetch(self, namespace: str, token_ids: TokenIds) -> SharedFetch | None:
        """The blocks after this replica's local prefix of ``token_ids``, from Valkey."""
        store = self.store
        data = token_bytes(token_ids)
        root = store.root_of(namespace)
        hashes = chain_hashes(root, data, store.block_size, store.hash_fn)
        if not hashes:
            return None
        start = store.local_prefix_blocks(namespace, hashes, data)
        if start >= len(hashes):
            return None
        parent = hashes[start - 1] if start else root
        tokens = [store.index.tokens_of(data, i) for i in range(start, len(hashes))]
        return self.tier.fetch(namespace, start, parent, hashes[start:], tokens, self.cost)
