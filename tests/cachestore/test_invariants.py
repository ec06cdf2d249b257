"""Stateful property tests: random request mixes must never break the cache's invariants.

Every page of a sequence is stamped with a value derived from (namespace, prefix tokens),
standing in for the KV the model would write. A match must hand back pages carrying the
stamp of exactly the prompt's prefix: that checks token verification, namespaces, page
reuse and the demote/promote copies at once.
"""

from __future__ import annotations

import zlib

import torch
import xxhash
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvgate.cachestore import CacheSeq, CacheStore
from kvgate.cachestore.block import DEVICE, HOST, Block
from kvgate.kernels.layout import KVLayout
from tests.cachestore.conftest import BLOCK, FakeClock, expire

NAMESPACES = ["tenant:1", "tenant:2"]
SEGMENTS = [list(range(j * 100, j * 100 + n)) for j, n in enumerate([4, 8, 5, 12, 3, 4, 9])]
prompts = st.lists(st.integers(0, len(SEGMENTS) - 1), min_size=1, max_size=4).map(
    lambda ids: [t for j in ids for t in SEGMENTS[j]]
)


def stamp(namespace: str, prefix: list[int]) -> float:
    return float(zlib.crc32(repr((namespace, prefix)).encode()) % (1 << 20))


def full_hash(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


def colliding_hash(data: bytes) -> bytes:
    """Only 16 distinct digests."""
    return bytes([xxhash.xxh3_128_digest(data)[0] & 0x0F]) * 16


class CacheMachine(RuleBasedStateMachine):
    hash_fn = staticmethod(full_hash)
    eviction = "adaptive"

    def __init__(self) -> None:
        super().__init__()
        self.layout = KVLayout(1, 1, 1, BLOCK, torch.float32)
        pb = self.layout.page_bytes
        self.clock = FakeClock()
        self.store = CacheStore(self.layout, 7 * pb, 4 * pb, clock=self.clock, hash_fn=self.hash_fn,
                                eviction=self.eviction)
        self.running: list[tuple[CacheSeq, list[int]]] = []
        self.quota_pages: dict[str, int] = {}
        self.pinned: set[int] = set()  # ids of blocks pinned and not released by flush/unpin
        self.billed: dict[str, tuple[int, int]] = {}  # namespace -> (prompt tokens, cached)
        self.next_id = 0

    # -- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.running) < 3)
    @rule(ns=st.sampled_from(NAMESPACES), prompt=prompts, gen=st.integers(0, 6),
          ttl=st.sampled_from([None, 60.0, 3600.0]))
    def start(self, ns: str, prompt: list[int], gen: int, ttl: float | None) -> None:
        tokens = prompt + [7] * gen
        before = {id(b): (b.ref_count, b.expires_at, b.pinned) for b in self.store.index.values()}
        now = self.clock()
        self.next_id += 1
        seq = self.store.open(f"s{self.next_id}", ns, default_ttl_s=ttl)
        m = self.store.match(seq, prompt[:-1])
        self.store.record_prompt(ns, len(prompt), m.num_cached_tokens)  # the engine bills once
        total, cached = self.billed.get(ns, (0, 0))
        self.billed[ns] = (total + len(prompt), cached + m.num_cached_tokens)
        assert m.num_blocks == len(seq.block_table) == len(seq.blocks)
        assert m.num_cached_tokens == m.num_blocks * BLOCK <= len(prompt) - 1
        for i, block in enumerate(seq.blocks):
            assert block.namespace == ns and block.tier == DEVICE
            assert block.tokens == b"".join(t.to_bytes(4, "little") for t in tokens[i * BLOCK:(i + 1) * BLOCK])
            refs, expires_at, pinned = before[id(block)]
            assert refs > 0 or pinned or expires_at > now, "an expired block was returned"
            want = stamp(ns, tokens[: (i + 1) * BLOCK])
            assert bool((self.store.device_pool[seq.block_table[i]] == want).all()), "wrong page bytes"
        if not self.store.allocate(seq, len(tokens)):
            self.store.release(seq)  # the engine would preempt
            return
        for i in range(m.num_blocks, len(seq.block_table)):
            self.store.device_pool[seq.block_table[i]].fill_(stamp(ns, tokens[: (i + 1) * BLOCK]))
        self.running.append((seq, tokens))

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 2), upto=st.integers(0, 40))
    def commit(self, pick: int, upto: int) -> None:
        seq, tokens = self.running[pick % len(self.running)]
        written = self.store.commit(seq, tokens[: max(upto, seq.num_committed_blocks * BLOCK)])
        assert set(written) <= {60.0, 300.0, 3600.0}, "a write keyed by something but its TTL"
        assert all(n > 0 and n % BLOCK == 0 for n in written.values())

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 2))
    def release(self, pick: int) -> None:
        seq, _ = self.running.pop(pick % len(self.running))
        self.store.release(seq)

    @rule(seconds=st.sampled_from([1.0, 61.0, 301.0, 3601.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(ns=st.sampled_from(NAMESPACES))
    def expire_idle(self, ns: str) -> None:
        expire(self.store, ns)  # what a request's match drops first

    @rule(ns=st.sampled_from(NAMESPACES))
    def flush(self, ns: str) -> None:
        self.store.flush(ns)
        self.pinned = {i for i in self.pinned
                       if (b := self._pinned_block(i)) is not None and b.namespace != ns}

    @rule(ns=st.sampled_from(NAMESPACES), pages=st.sampled_from([None, 0, 1, 3, 5]))
    def set_quota(self, ns: str, pages: int | None) -> None:
        self.store.set_quota(ns, None if pages is None else pages * self.layout.page_bytes)
        if pages is None:
            self.quota_pages.pop(ns, None)
        else:
            self.quota_pages[ns] = pages

    @rule(ns=st.sampled_from(NAMESPACES), prompt=prompts)
    def pin(self, ns: str, prompt: list[int]) -> None:
        self.store.pin(ns, prompt)
        self.pinned |= {id(b) for b in self.store.index.values() if b.pinned}

    @rule(ns=st.sampled_from(NAMESPACES))
    def unpin(self, ns: str) -> None:
        self.store.unpin(ns)
        self.pinned = {i for i in self.pinned if self._pinned_block(i) is not None}

    def _pinned_block(self, block_id: int) -> Block | None:
        return next((b for b in self.store.index.values() if id(b) == block_id and b.pinned), None)

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def pages_are_free_or_used_never_both(self) -> None:
        s = self.store
        device_used = [b.page for b in s.index.values() if b.tier == DEVICE]
        for seq, _ in self.running:
            device_used += [p for i, p in enumerate(seq.block_table)
                            if i >= len(seq.blocks) or seq.blocks[i].page != p]
        host_used = [b.page for b in s.index.values() if b.tier == HOST]
        for pool, used in ((s.device, device_used), (s.host, host_used)):
            assert len(used) == len(set(used)), "a page is used twice"
            assert not any(pool._is_free[p] for p in used), "a used page is on the free list"
            assert len(used) == pool.num_used <= pool.num_pages, "a page leaked or capacity exceeded"

    @invariant()
    def refcounts_match_holders_and_active_blocks_stay(self) -> None:
        holders: dict[int, int] = {}
        for seq, _ in self.running:
            for b in seq.blocks:
                assert b.alive and b.tier == DEVICE and self.store.index.get(b.hash) is b
                assert b.namespace == seq.namespace
                holders[id(b)] = holders.get(id(b), 0) + 1
        for b in self.store.index.values():
            assert b.ref_count == holders.get(id(b), 0) >= 0

    @invariant()
    def index_is_a_forest_of_live_chains(self) -> None:
        for h, b in self.store.index.items():
            assert b.hash == h and b.alive
            if b.parent is not None:
                assert b.parent.alive and self.store.index.get(b.parent.hash) is b.parent
                assert b.parent.namespace == b.namespace and b in b.parent.children

    @invariant()
    def prefixes_are_never_colder_than_their_extensions(self) -> None:
        """Deepest first: a parent leaves the device only after its children did."""
        for b in self.store.index.values():
            if b.tier == DEVICE and b.parent is not None:
                assert b.parent.tier == DEVICE, "a parent was demoted before its child"

    @invariant()
    def quotas_hold(self) -> None:
        for ns, pages in self.quota_pages.items():
            held = [b for b in self.store.index.values() if b.namespace == ns]
            if len(held) > pages:  # only allowed while nothing of it could be evicted
                assert all(b.ref_count > 0 or b.pinned for b in held)

    @invariant()
    def pinned_blocks_stay(self) -> None:
        alive = {id(b) for b in self.store.index.values()}
        assert self.pinned <= alive

    @invariant()
    def stats_agree_with_the_blocks(self) -> None:
        st_ = self.store.stats()
        idle = sum(1 for b in self.store.index.values() if b.tier == DEVICE and b.ref_count == 0)
        assert st_.device.blocks["cached"] == idle
        assert sum(st_.device.blocks.values()) == st_.device.capacity_pages
        assert st_.host.blocks["offloaded"] + st_.host.blocks["free"] == st_.host.capacity_pages
        assert min(st_.evictions.as_dict().values()) >= 0

    @invariant()
    def hits_and_misses_add_up_to_the_billed_prompts(self) -> None:
        st_ = self.store.stats()
        for ns, (total, cached) in self.billed.items():
            counted = st_.namespaces[ns]
            assert (counted.hit_tokens, counted.miss_tokens) == (cached, total - cached)
        assert st_.hit_tokens + st_.miss_tokens == sum(t for t, _ in self.billed.values())


class CollidingCacheMachine(CacheMachine):
    """Only 16 distinct hashes: collisions on almost every request."""

    hash_fn = staticmethod(colliding_hash)


_settings = settings(max_examples=40, stateful_step_count=30, deadline=None, report_multiple_bugs=False,
                     suppress_health_check=list(HealthCheck))
TestCacheInvariants = CacheMachine.TestCase
TestCacheInvariants.settings = _settings
TestCacheInvariantsWithCollisions = CollidingCacheMachine.TestCase
TestCacheInvariantsWithCollisions.settings = _settings


class LruCacheMachine(CacheMachine):
    """The same invariants under each fixed eviction order the adaptive policy may follow."""

    eviction = "lru"


class NewestCacheMachine(CacheMachine):
    eviction = "newest"


TestCacheInvariantsLru = LruCacheMachine.TestCase
TestCacheInvariantsLru.settings = _settings
TestCacheInvariantsNewest = NewestCacheMachine.TestCase
TestCacheInvariantsNewest.settings = _settings
