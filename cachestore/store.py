"""The engine-facing prefix cache: match, allocate, commit, release, flush.

Life of a page (DESIGN.md, Pages and tiers): ``free`` → ``active`` (held by a running
sequence; never evicted or moved) → ``cached`` (refcount 0, in the index, evictable) →
``offloaded`` (demoted to the host pool) → ``active`` again on a hit (promoted into a
fresh device page), or dropped.

Choices the specification leaves open:
- A dropped block takes its descendants with it (they could never be matched again,
  since a match walks the chain from the root). They are idle too: a sequence holding a
  block always holds its whole prefix.
- Evictions count blocks that leave the cache (``lru``, ``ttl``, ``quota``); a device
  eviction that finds room on the host is a demotion, counted there. ``flush`` is an
  operator action, not an eviction.
- Quota counts every indexed block of the namespace on both tiers, whatever its state;
  a block that would push it over the quota, even after the namespace gave up its idle
  blocks, is not indexed (its tokens stay uncached; the sequence keeps its page).
- A block committed while the same block is already indexed (another sequence got there
  first) is shared, not written: the sequence references the indexed block and keeps its
  own page as a private copy. If the indexed block sits on the host, the sequence's fresh
  device page simply becomes its page (no copy).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cachestore.block import DEVICE, HOST, Block, CacheSeq, PrefixMatch, ttl_class
from cachestore.hashing import TOKEN_BYTES, HashFn, chain_hashes, root_digest, token_bytes, xxh3_128
from cachestore.policy import EvictionPolicy, is_expired
from cachestore.pool import PagePool
from cachestore.stats import EVICTION_REASONS, CacheStats, NamespaceStats, TierStats
from cachestore.tiers import promote, reserve_device
from kernels.layout import KVLayout

Tokens = Sequence[int] | np.ndarray


class CacheStore:
    def __init__(
        self,
        layout: KVLayout,
        device_bytes: int,
        host_bytes: int,
        device: torch.device | str = "cpu",
        model_id: str = "demo",
        adapter_id: str = "",
        default_ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        hash_fn: HashFn = xxh3_128,
    ) -> None:
        """``hash_fn`` is replaceable so tests can force collisions; keep the default."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.layout = layout
        self.block_size = layout.block_size
        self.model_id = model_id
        self.adapter_id = adapter_id
        self.default_ttl_s = float(default_ttl_s)
        self.clock = clock
        self.hash_fn = hash_fn
        self.device = PagePool(layout, layout.pages_for_bytes(device_bytes), device, False)
        self.host = PagePool(layout, layout.pages_for_bytes(host_bytes), "cpu", True)
        self.device_pool = self.device.tensor
        self.host_pool = self.host.tensor
        self.index: dict[bytes, Block] = {}
        self.policy = EvictionPolicy(self.device.num_pages, self.host.num_pages)
        self.seqs: dict[str, CacheSeq] = {}  # sequences holding pages
        self._roots: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._idle_device = 0  # device blocks with refcount 0 ("cached")
        self._ns_blocks: dict[str, int] = defaultdict(int)
        self._ns_hits: dict[str, int] = defaultdict(int)
        self._ns_misses: dict[str, int] = defaultdict(int)
        self._evictions = dict.fromkeys(EVICTION_REASONS, 0)
        self._promotions = [0, 0]  # count, bytes
        self._demotions = [0, 0]

    # -- the engine's interface ---------------------------------------------------------
    def open(
        self,
        seq_id: str,
        namespace: str,
        ttl_segments: list[tuple[int, float]] | None = None,
        default_ttl_s: float | None = None,
    ) -> CacheSeq:
        return CacheSeq(seq_id, namespace, list(ttl_segments or []), default_ttl_s)

    def match(self, seq: CacheSeq, token_ids: Tokens) -> PrefixMatch:
        """Reference the longest cached prefix of ``token_ids`` and put it on the device."""
        with self._lock:
            if seq.block_table:
                raise RuntimeError(f"match {seq.seq_id!r} before allocating, or release it first")
            now = self.clock()
            self._expire(now)
            data = token_bytes(token_ids)
            step = self.block_size * TOKEN_BYTES
            hashes = chain_hashes(self._root(seq.namespace), data, self.block_size, self.hash_fn)
            matched: list[Block] = []
            parent: Block | None = None
            for i, h in enumerate(hashes):
                block = self.index.get(h)
                if block is None or block.parent is not parent or block.namespace != seq.namespace:
                    break
                if block.tokens != data[i * step : (i + 1) * step]:
                    break  # a hash collision: a miss, never a wrong block
                if is_expired(block, now):
                    self._drop(block, "ttl")
                    break
                self._ref(block)
                block.hits += 1
                block.ttl_s = max(block.ttl_s, seq.ttl_for_block(i, self.block_size, self.default_ttl_s))
                matched.append(block)
                parent = block
            matched, host_hits = promote(self, matched)
            seq.blocks = matched
            seq.block_table = [b.page for b in matched]
            seq.num_committed_blocks = len(matched)
            seq.chain_broken = False
            self.seqs[seq.seq_id] = seq
            hit = len(matched) * self.block_size
            miss = len(data) // TOKEN_BYTES - hit
            self._ns_hits[seq.namespace] += hit
            self._ns_misses[seq.namespace] += miss
            return PrefixMatch(hit, len(matched), len(matched) - host_hits, host_hits)

    def allocate(self, seq: CacheSeq, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens``; False (nothing taken) when no room."""
        with self._lock:
            need = -(-num_tokens // self.block_size) - len(seq.block_table)
            if need <= 0:
                return True
            self._expire(self.clock())
            if not reserve_device(self, need):
                return False
            seq.block_table.extend(self.device.take() for _ in range(need))
            self.seqs[seq.seq_id] = seq
            return True

    def commit(self, seq: CacheSeq, token_ids: Tokens) -> dict[str, int]:
        """Index the sequence's full blocks not yet committed; → tokens newly written by TTL class."""
        written = {"5m": 0, "1h": 0}
        with self._lock:
            step = self.block_size * TOKEN_BYTES
            data = token_bytes(token_ids)
            start = seq.num_committed_blocks
            end = min(len(data) // step, len(seq.block_table))
            if end <= start:
                return written
            seq.num_committed_blocks = end
            if seq.chain_broken:
                return written
            now = self.clock()
            self._expire(now)
            parent = seq.blocks[-1] if seq.blocks else None
            parent_hash = parent.hash if parent is not None else self._root(seq.namespace)
            hashes = chain_hashes(parent_hash, data[start * step : end * step], self.block_size, self.hash_fn)
            for i, h in enumerate(hashes, start):
                tokens = data[i * step : (i + 1) * step]
                ttl_s = seq.ttl_for_block(i, self.block_size, self.default_ttl_s)
                block = self.index.get(h)
                if block is not None and is_expired(block, now):
                    self._drop(block, "ttl")
                    block = None
                if block is not None:
                    if block.parent is not parent or block.tokens != tokens or block.namespace != seq.namespace:
                        seq.chain_broken = True  # a collision: this and later blocks stay private
                        break
                    self._share(block, seq.block_table[i])
                    block.hits += 1
                    block.ttl_s = max(block.ttl_s, ttl_s)
                elif self._enforce_quota(seq.namespace, extra_blocks=1):
                    block = self._index_new(h, parent, seq.namespace, tokens, i, seq.block_table[i], ttl_s)
                    written[ttl_class(ttl_s)] += self.block_size
                else:
                    seq.chain_broken = True
                    break
                seq.blocks.append(block)
                parent = block
            return written

    def release(self, seq: CacheSeq) -> None:
        """The sequence finished or was preempted: its committed blocks stay cached."""
        with self._lock:
            now = self.clock()
            for i, page in enumerate(seq.block_table):
                if i >= len(seq.blocks) or seq.blocks[i].page != page:
                    self.device.give_back(page)  # never indexed, or a private copy
            idle: list[Block] = []
            for block in seq.blocks:
                block.ref_count -= 1
                if block.ref_count < 0:
                    raise RuntimeError("refcount below zero: a sequence was released twice")
                block.expires_at = now + block.ttl_s
                if block.ref_count == 0:
                    self._idle_device += 1
                    idle.append(block)
                    self.policy.schedule_expiry(block)
            self.policy.add_released(idle)
            if idle:
                self._enforce_quota(seq.namespace)
            seq.block_table = []
            seq.blocks = []
            seq.num_committed_blocks = 0
            seq.chain_broken = False
            self.seqs.pop(seq.seq_id, None)

    def flush(self, namespace: str) -> int:
        """Drop every idle block of the namespace (pinned ones too; its pins are cleared)."""
        with self._lock:
            self.policy.pins.pop(namespace, None)
            victims = [b for b in self.index.values() if b.namespace == namespace and b.ref_count == 0]
            before = sum(1 for b in self.index.values() if b.namespace == namespace)
            for block in victims:
                if block.alive:  # not already gone with a dropped parent
                    block.pinned = False
                    self._drop(block, None)
            return before - sum(1 for b in self.index.values() if b.namespace == namespace)

    def set_quota(self, namespace: str, quota_bytes: int | None) -> None:
        with self._lock:
            if quota_bytes is None:
                self.policy.quotas.pop(namespace, None)
                return
            self.policy.quotas[namespace] = int(quota_bytes)
            self._enforce_quota(namespace)

    def pin(self, namespace: str, token_ids: Tokens) -> int:
        """Keep this prefix forever (counted in quota); → blocks of it pinned now."""
        with self._lock:
            data = token_bytes(token_ids)
            hashes = chain_hashes(self._root(namespace), data, self.block_size, self.hash_fn)
            self.policy.pins[namespace].update(hashes)
            step = self.block_size * TOKEN_BYTES
            parent: Block | None = None
            for i, h in enumerate(hashes):
                block = self.index.get(h)
                if block is None or block.parent is not parent or block.namespace != namespace:
                    return i
                if block.tokens != data[i * step : (i + 1) * step]:
                    return i
                if not block.pinned:
                    self.policy.remove(block)
                    block.pinned = True
                parent = block
            return len(hashes)

    def unpin(self, namespace: str) -> None:
        with self._lock:
            self.policy.pins.pop(namespace, None)
            for block in [b for b in self.index.values() if b.namespace == namespace and b.pinned]:
                self._unpin(block)
            self._enforce_quota(namespace)

    def sweep(self) -> int:
        """Drop every expired block now (also done lazily on access); → blocks dropped."""
        with self._lock:
            return self._expire(self.clock())

    def stats(self) -> CacheStats:
        with self._lock:
            pb = self.layout.page_bytes
            active = self.device.num_used - self._idle_device
            device = TierStats(self.device.num_pages, self.device.num_used, pb, {
                "free": self.device.num_free, "active": active, "cached": self._idle_device})
            host = TierStats(self.host.num_pages, self.host.num_used, pb, {
                "free": self.host.num_free, "offloaded": self.host.num_used})
            names = set(self._ns_blocks) | set(self._ns_hits)
            namespaces = {
                ns: NamespaceStats(self._ns_bytes(ns), self._ns_hits[ns], self._ns_misses[ns])
                for ns in names
            }
            return CacheStats(
                device, host,
                hit_tokens=sum(self._ns_hits.values()),
                miss_tokens=sum(self._ns_misses.values()),
                evictions=dict(self._evictions),
                promotions={"count": self._promotions[0], "bytes": self._promotions[1]},
                demotions={"count": self._demotions[0], "bytes": self._demotions[1]},
                namespaces=namespaces,
            )

    # -- bookkeeping ----------------------------------------------------------------------
    def _root(self, namespace: str) -> bytes:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = root_digest(self.model_id, self.adapter_id, namespace)
        return root

    def _ns_bytes(self, namespace: str) -> int:
        return self._ns_blocks.get(namespace, 0) * self.layout.page_bytes

    def _ref(self, block: Block) -> None:
        if block.ref_count == 0:
            self.policy.remove(block)
            if block.tier == DEVICE:
                self._idle_device -= 1
        block.ref_count += 1

    def _unpin(self, block: Block) -> None:
        if block.pinned:
            block.pinned = False
            if block.ref_count == 0:
                self.policy.add(block)
                self.policy.schedule_expiry(block)

    def _share(self, block: Block, own_page: int) -> None:
        if block.tier == HOST:  # adopt the fresh device page instead of promoting
            self._ref(block)
            self.host.give_back(block.page)
            block.tier, block.page = DEVICE, own_page
        else:
            self._ref(block)

    def _index_new(
        self, h: bytes, parent: Block | None, namespace: str, tokens: bytes, depth: int, page: int,
        ttl_s: float,
    ) -> Block:
        block = Block(h, parent, namespace, bytes(tokens), depth, DEVICE, page, ttl_s, ref_count=1)
        block.pinned = (parent is None or parent.pinned) and self.policy.is_pinned(namespace, h)
        self.index[h] = block
        if parent is not None:
            parent.children.add(block)
        self._ns_blocks[namespace] += 1
        return block

    def _enforce_quota(self, namespace: str, extra_blocks: int = 0) -> bool:
        """Drop the namespace's own idle blocks until it (plus ``extra_blocks``) fits its quota.

        False when only active or pinned blocks are left and it still does not fit.
        """
        extra = extra_blocks * self.layout.page_bytes
        while self.policy.over_quota(namespace, self._ns_bytes(namespace) + extra):
            victim = self.policy.namespace_victim(namespace)
            if victim is None:
                return False
            self._drop(victim, "quota")
        return True

    def _drop(self, block: Block, reason: str | None) -> None:
        """Remove ``block`` and its descendants from the cache (they are all idle)."""
        stack = [block]
        while stack:
            b = stack.pop()
            if not b.alive:
                continue
            if b.ref_count:
                raise RuntimeError("an active block cannot be dropped")
            stack.extend(b.children)
            b.alive = False
            b.children = set()
            self.policy.remove(b)
            if self.index.get(b.hash) is b:
                del self.index[b.hash]
            if b.parent is not None:
                b.parent.children.discard(b)
            if b.tier == DEVICE:
                self._idle_device -= 1
                self.device.give_back(b.page)
            else:
                self.host.give_back(b.page)
            self._ns_blocks[b.namespace] -= 1
            if not self._ns_blocks[b.namespace]:
                del self._ns_blocks[b.namespace]
            if reason is not None:
                self._evictions[reason] += 1

    def _expire(self, now: float) -> int:
        due = [b for b in self.policy.pop_expired(now) if b.alive]
        for block in due:
            self._drop(block, "ttl")
        return len(due)
