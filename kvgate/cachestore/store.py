"""The engine-facing prefix cache: match, allocate, commit, release, flush.

``CacheStore`` is the interface the scheduler sees (vLLM v1's ``KVCacheManager``). The
work is done by its parts: ``PrefixIndex`` (blocks, references, pages), ``EvictionPolicy``
(who goes next), ``TierMoves`` (demotion and promotion), ``Shares`` (reserved capacity),
``CacheCounters`` (what ``stats()`` reports) and ``RemoteLink`` (the tiers below the host).
The store hashes prompts, decides TTLs, quotas and pins, and holds the lock its state is
read and changed under. A page is ``free``, ``active`` (a running sequence holds it),
``cached`` (idle in the index), ``offloaded`` (demoted to the host), and ``active`` again on
a hit. docs/architecture.md (cachestore) has the rules it keeps: what counts as an
eviction, quotas, a block another sequence indexed first, hit counting, blocks being
computed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kvgate.cachestore.block import DEVICE, HOST, TIERS, Block, CacheSeq, PrefixMatch, Tier
from kvgate.cachestore.counters import CacheCounters, PromptTokens
from kvgate.cachestore.duel import sampled
from kvgate.cachestore.events import CacheEvent
from kvgate.cachestore.hashing import (
    HashFn,
    TokenIds,
    chain_hashes,
    root_digest,
    token_bytes,
    xxh3_128,
)
from kvgate.cachestore.index import PrefixIndex
from kvgate.cachestore.policy import EvictionPolicy, is_expired
from kvgate.cachestore.pool import PagePool
from kvgate.cachestore.record import RemoteFetch
from kvgate.cachestore.remote_link import LinkedTier, RemoteLink
from kvgate.cachestore.remote_tier import CostModel
from kvgate.cachestore.shares import Shares
from kvgate.cachestore.stats import (
    CacheStats,
    HotPrefix,
    NamespaceShare,
    NamespaceStats,
    ShareSummary,
    TierStats,
    hottest_prefixes,
)
from kvgate.cachestore.tiers import TierMoves
from kvgate.kernels.layout import KVLayout, convert_pages, dtype_name


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
        shares: bool = False,
        share_window_s: float | None = None,
        eviction: str = "adaptive",
        host_layout: KVLayout | None = None,
    ) -> None:
        """``hash_fn`` is replaceable so tests can force collisions; keep the default.

        ``shares``: fair shares for every active namespace (``kvgate.cachestore.shares``; off by
        default: only reservations protect); a namespace is active for ``share_window_s``
        after its last request (default: ``default_ttl_s``).

        ``eviction``: ``adaptive`` (the default: the order that wins a shadow simulation on
        sampled blocks, ``kvgate.cachestore.duel``) or a fixed order (``lru``, ``slru``, ``newest``).

        ``host_layout``: the host tier's pages when they differ from the device's (another KV
        dtype, ``--offload-kv-dtype``); pages are converted as they move between the tiers.
        Quotas count a block at the device page's size on either tier.
        """
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
        self.host_layout = host_layout or layout
        self.host = PagePool(self.host_layout, self.host_layout.pages_for_bytes(host_bytes), "cpu",
                             True)
        self.device_pool = self.device.tensor
        self.host_pool = self.host.tensor
        self.policy = EvictionPolicy(self.device.num_pages, self.host.num_pages, mode=eviction)
        self.index = PrefixIndex(self.device, self.host, self.policy)
        self.counters = CacheCounters()
        window_s = self.default_ttl_s if share_window_s is None else float(share_window_s)
        self.shares = Shares(self.device, self.host, shares, window_s)
        self.tiers = TierMoves(self.device, self.host, self.index, self.policy, self.counters,
                               self.shares)
        self.seqs: dict[str, CacheSeq] = {}  # sequences holding pages
        self._roots: dict[str, bytes] = {}
        self._observed: OrderedDict[str, None] = OrderedDict()  # seq ids the duel has seen
        self._queued: dict[str, tuple[int, list[bytes]]] = {}  # hold_queued's hashes by key
        self._computing: dict[bytes, CacheSeq] = {}  # announced block hash -> who computes it
        # pins by namespace and key (``pin(..., key=)``); "" holds the namespace-wide pins
        self._pin_keys: defaultdict[str, dict[str, set[bytes]]] = defaultdict(dict)
        self._lock = threading.Lock()
        # the tiers below the host, disk then Valkey (``attach_tier``); None: none
        self.remote: RemoteLink | None = None

    # -- the engine's interface ---------------------------------------------------------
    def open(
        self,
        seq_id: str,
        namespace: str,
        ttl_segments: list[tuple[int, float]] | None = None,
        default_ttl_s: float | None = None,
    ) -> CacheSeq:
        return CacheSeq(seq_id, namespace, list(ttl_segments or []), default_ttl_s)

    def match(self, seq: CacheSeq, token_ids: TokenIds) -> PrefixMatch:
        """Reference the longest cached prefix of ``token_ids`` and put it on the device."""
        with self._lock:
            if seq.block_table:
                raise RuntimeError(f"match {seq.seq_id!r} before allocating, or release it first")
            now = self.clock()
            self._expire(now)
            self.shares.touch(seq.namespace, now)
            data = token_bytes(token_ids)
            hashes = chain_hashes(self._root(seq.namespace), data, self.block_size, self.hash_fn)
            self._observe(seq, hashes, now)
            matched: list[Block] = []
            for block in self.index.walk(seq.namespace, hashes, data):
                if is_expired(block, now):
                    self.counters.evictions.ttl += len(self.index.drop(block))
                    break
                self.index.ref(block)
                block.hits += 1
                ttl_s = seq.ttl_for_block(len(matched), self.block_size, self.default_ttl_s)
                block.ttl_s = max(block.ttl_s, ttl_s)
                matched.append(block)
            found = [(b.hash, b.fetched or b.tier) for b in matched]
            matched, host_hits = self.tiers.promote(matched)
            for block in matched:
                block.fetched = ""
            seq.blocks = matched
            seq.block_table = [b.page for b in matched]
            seq.num_committed_blocks = len(matched)
            seq.chain_broken = False
            self.seqs[seq.seq_id] = seq
            n = len(matched)
            return PrefixMatch(n * self.block_size, n, n - host_hits, host_hits,
                               tuple(found[:n]))

    def touch(self, namespaces: Iterable[str]) -> None:
        """Those namespaces are active now (what ``allocate`` notes of each sequence it
        grows): for a step's decodes whose pages already hold their next token, once per
        namespace rather than once per sequence."""
        with self._lock:
            now = self.clock()
            for namespace in namespaces:
                self.shares.touch(namespace, now)

    def allocate(self, seq: CacheSeq, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens``; False (nothing taken) when no room."""
        with self._lock:
            need = -(-num_tokens // self.block_size) - len(seq.block_table)
            now = self.clock()
            self.shares.touch(seq.namespace, now)
            if need <= 0:
                return True
            self._expire(now)
            if not self.tiers.reserve_device(need, seq.namespace):
                return False
            seq.block_table.extend(self.device.take(seq.namespace) for _ in range(need))
            self.seqs[seq.seq_id] = seq
            return True

    def commit(self, seq: CacheSeq, token_ids: TokenIds) -> dict[float, int]:
        """Index the sequence's full blocks not yet committed.

        → tokens newly written, keyed by the TTL in seconds of the blocks that hold them
        (``{300.0: 32, 3600.0: 16}``); empty when nothing was written. Blocks another
        sequence indexed first are reused, not written.
        """
        with self._lock:
            data = token_bytes(token_ids)
            step = self.index.block_bytes
            start = seq.num_committed_blocks
            end = min(len(data) // step, len(seq.block_table))
            if end <= start:
                return {}
            seq.num_committed_blocks = end
            self._computed(seq, end)
            if seq.chain_broken:
                return {}
            now = self.clock()
            self._expire(now)
            parent = seq.blocks[-1] if seq.blocks else None
            parent_hash = parent.hash if parent is not None else self._root(seq.namespace)
            hashes = chain_hashes(parent_hash, data[start * step : end * step], self.block_size,
                                  self.hash_fn)
            written: dict[float, int] = {}
            new_blocks: list[Block] = []
            for i, block_hash in enumerate(hashes, start):
                tokens = self.index.tokens_of(data, i)
                ttl_s = seq.ttl_for_block(i, self.block_size, self.default_ttl_s)
                block = self._live(block_hash, now)
                if block is not None:
                    if not self.index.verify(block, parent, seq.namespace, tokens):
                        seq.chain_broken = True  # a collision: this and later blocks stay private
                        break
                    self._reuse(block, seq.block_table[i], ttl_s)
                else:
                    block = self._insert(seq, i, block_hash, parent, tokens, seq.block_table[i])
                    if block is None:  # over quota: this and later blocks stay private
                        seq.chain_broken = True
                        break
                    written[ttl_s] = written.get(ttl_s, 0) + self.block_size
                    seq.written.append((block_hash, ttl_s))
                    new_blocks.append(block)
                seq.blocks.append(block)
                parent = block
            if self.remote is not None and new_blocks:
                self.remote.write_through(new_blocks)
            return written

    def release(self, seq: CacheSeq) -> None:
        """The sequence finished or was preempted: its committed blocks stay cached."""
        with self._lock:
            for i, page in enumerate(seq.block_table):
                if i >= len(seq.blocks) or seq.blocks[i].page != page:
                    self.device.give_back(page)  # never indexed, or a private copy
            now = self.policy.now = self.clock()
            if self.index.unref(seq.blocks, now=now):
                self._enforce_quota(seq.namespace)
            self._computed(seq, seq.computing_from + len(seq.computing))
            seq.computing_from = 0
            seq.block_table = []
            seq.blocks = []
            seq.num_committed_blocks = 0
            seq.chain_broken = False
            seq.written = []
            self.seqs.pop(seq.seq_id, None)

    # -- blocks being computed (one prefill per prefix) -----------------------------------
    def block_hashes(self, namespace: str, token_ids: TokenIds) -> list[bytes]:
        """The chain hashes of every full block of ``token_ids`` in ``namespace``."""
        return chain_hashes(self._root(namespace), token_bytes(token_ids), self.block_size,
                            self.hash_fn)

    def announce(self, seq: CacheSeq, hashes: list[bytes]) -> int:
        """``seq`` (just matched and allocated) computes the blocks ``hashes`` names after
        its matched prefix (``hashes``: ``block_hashes`` of its tokens): queued prompts
        that need them next may wait for its commits. A block another running sequence
        announced first stays that one's. → blocks announced."""
        with self._lock:
            self._computed(seq, seq.computing_from + len(seq.computing))
            start = seq.num_committed_blocks
            seq.computing_from, seq.computing = start, hashes[start:]
            claimed = 0
            for block_hash in seq.computing:
                if self._computing.setdefault(block_hash, seq) is seq:
                    claimed += 1
            return claimed

    def in_flight(self, namespace: str, hashes: list[bytes], num_blocks: int, start: int = 0
                  ) -> tuple[int, str] | None:
        """The first of the leading ``num_blocks`` blocks of a queued prompt (``hashes``,
        from ``block_hashes``) that is not cached, and the id of the running sequence of
        ``namespace`` computing it now; None when it is cached or nobody computes it.

        ``start``: where the previous answer for this prompt was (the blocks before it
        were cached then; not checked again, so a long wait costs one walk, not one per
        step). A block before it evicted since is simply computed after the wait."""
        with self._lock:
            if not self._computing:
                return None
            now = self.clock()
            parent = self.index.get(hashes[start - 1]) if 0 < start <= num_blocks else None
            if parent is None or parent.namespace != namespace:
                parent, start = None, 0
            for i in range(start, num_blocks):
                block_hash = hashes[i]
                block = self.index.get(block_hash)
                if (block is not None and block.parent is parent and block.namespace == namespace
                        and not is_expired(block, now)):
                    parent = block
                    continue
                seq = self._computing.get(block_hash)
                if seq is None or seq.namespace != namespace:
                    return None
                return i, seq.seq_id
            return None

    def record_wait(self, *, waited: bool = False, timed_out: bool = False,
                    saved_tokens: int = 0) -> None:
        """Count a request that started waiting, a wait that reached its bound, and the
        prompt tokens a request read from the cache because it waited (``stats()``)."""
        with self._lock:
            counters = self.counters.single_flight
            counters.waited += int(waited)
            counters.timed_out += int(timed_out)
            counters.saved_tokens += saved_tokens

    def _computed(self, seq: CacheSeq, end: int) -> None:
        """``seq``'s announced blocks before block ``end`` are done (committed, or never
        will be): nobody waits for them any more."""
        done = end - seq.computing_from
        if done <= 0:
            return
        for block_hash in seq.computing[:done]:
            if self._computing.get(block_hash) is seq:
                del self._computing[block_hash]
        seq.computing = seq.computing[done:]
        seq.computing_from = end

    def hold_queued(self, queued: dict[str, tuple[str, TokenIds]]) -> int:
        """The prompts of queued requests, by a key stable while they wait (their sequence
        id) → (namespace, token ids); replaces the previous call's. The cached blocks they
        would match are evicted only after every other candidate (never skipped: shares and
        running requests still come first). → blocks held."""
        with self._lock:
            previous, self._queued = self._queued, {}
            held: set[Block] = set()
            for key, (namespace, token_ids) in queued.items():
                known = previous.get(key)
                if known is not None and known[0] == len(token_ids):
                    hashes = known[1]
                else:
                    data = token_bytes(token_ids)
                    hashes = chain_hashes(self._root(namespace), data, self.block_size,
                                          self.hash_fn)
                self._queued[key] = (len(token_ids), hashes)
                parent: Block | None = None
                for block_hash in hashes:  # the prefix indexed now, by chain identity
                    block = self.index.get(block_hash)
                    if block is None or block.parent is not parent or block.namespace != namespace:
                        break
                    held.add(block)
                    parent = block
            self.policy.hold(held)
            return len(held)

    # -- the tiers below the host (``remote_link``) ----------------------------------------
    def attach_tier(self, tier: LinkedTier, cost: CostModel | None) -> None:
        """Write blocks through to ``tier`` from now on, and let ``fetch_remote`` read it,
        after the tiers attached before it (attach the disk tier before Valkey)."""
        with self._lock:
            if self.remote is None:
                self.remote = RemoteLink(self)
                self.tiers.on_demoted = self.remote.write_through
            self.remote.add(tier, cost)


    def fetch_remote(self, namespace: str, token_ids: TokenIds) -> RemoteFetch | None:
        """Blocks of ``token_ids`` after the local prefix, from the tiers below the host.
        File and network I/O: call it off the engine thread, then hand the result to
        ``adopt_remote``."""
        return None if self.remote is None else self.remote.fetch(namespace, token_ids)

    def adopt_remote(self, seq: CacheSeq, token_ids: TokenIds, fetched: RemoteFetch) -> int:
        """Index fetched blocks that extend the local prefix (before ``match``)."""
        with self._lock:
            return 0 if self.remote is None else self.remote.adopt(seq, token_ids, fetched)

    def local_prefix_blocks(self, namespace: str, hashes: list[bytes], data: bytes) -> int:
        """How many leading blocks of a prompt (its ``hashes`` and token bytes) are indexed."""
        with self._lock:
            return sum(1 for _ in self.index.walk(namespace, hashes, data))

    def root_of(self, namespace: str) -> bytes:
        """The namespace's root digest (the parent of its block 0)."""
        return self._root(namespace)

    def record_prompt(self, namespace: str, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one request's prompt as billed: ``cached_tokens`` hit, the rest missed.

        The engine calls it once per request (not per admission), with the prompt tokens
        and cached tokens it bills, so hit + miss in ``stats()`` adds up to the billed
        prompt tokens.
        """
        with self._lock:
            self.counters.record_prompt(namespace, prompt_tokens, cached_tokens)

    def flush(self, namespace: str) -> int:
        """Drop every idle block of the namespace (pinned ones too; its pins are cleared),
        and its entries in the tiers below the host (``flush_namespace``: new epochs)."""
        with self._lock:
            if self.remote is not None:
                for tier in self.remote.tiers:
                    tier.flush_namespace(namespace)
            self.policy.pins.pop(namespace, None)
            self._pin_keys.pop(namespace, None)
            before = self.index.num_blocks(namespace)
            victims = [b for b in self.index.values()
                       if b.namespace == namespace and b.ref_count == 0]
            for block in victims:
                if block.alive:  # not already gone with a dropped parent
                    block.pinned = False
                    self.index.drop(block)
            return before - self.index.num_blocks(namespace)

    def set_quota(self, namespace: str, quota_bytes: int | None) -> None:
        with self._lock:
            if quota_bytes is None:
                self.policy.quotas.pop(namespace, None)
                return
            self.policy.quotas[namespace] = int(quota_bytes)
            self._enforce_quota(namespace)

    def set_reservation(self, namespace: str, device_bytes: int | None,
                        host_bytes: int | None = None) -> None:
        """Reserved capacity (bytes on each tier; None: none there) that other namespaces'
        traffic cannot evict (``kvgate.cachestore.shares``)."""
        with self._lock:
            self.shares.set_reservation(namespace, device_bytes, host_bytes)

    def reservations(self) -> dict[str, dict[str, int]]:
        """Reserved bytes per namespace and tier, as the tiers can hold them."""
        with self._lock:
            return {ns: {str(t): n for t, n in by.items()}
                    for ns, by in self.shares.reservations().items()}

    def pin(self, namespace: str, token_ids: TokenIds, key: str = "") -> int:
        """Keep this prefix until unpinned (counted in quota); → blocks of it pinned now.

        Blocks not indexed yet are pinned when a sequence commits them. ``key`` names the
        pin so ``unpin(namespace, key)`` takes off that one alone (an explicit cache's);
        a block several keys pin stays pinned until the last of them goes."""
        with self._lock:
            data = token_bytes(token_ids)
            hashes = chain_hashes(self._root(namespace), data, self.block_size, self.hash_fn)
            self._pin_keys[namespace].setdefault(key, set()).update(hashes)
            self.policy.pins[namespace].update(hashes)
            pinned = 0
            for block in self.index.walk(namespace, hashes, data):
                if not block.pinned:
                    self.policy.remove(block)
                    block.pinned = True
                pinned += 1
            return pinned

    def unpin(self, namespace: str, key: str | None = None) -> None:
        """Take off every pin of the namespace (``key`` None) or the one pin ``key``."""
        with self._lock:
            keys = self._pin_keys.get(namespace, {})
            if key is None:
                self._pin_keys.pop(namespace, None)
                self.policy.pins.pop(namespace, None)
                blocks = [b for b in self.index.values() if b.namespace == namespace and b.pinned]
            else:
                gone = keys.pop(key, None)
                if gone is None:
                    return
                gone -= set().union(*keys.values())  # still held by another pin
                if keys:
                    self.policy.pins[namespace] -= gone
                else:
                    self._pin_keys.pop(namespace, None)
                    self.policy.pins.pop(namespace, None)
                blocks = [b for b in map(self.index.get, gone)
                          if b is not None and b.namespace == namespace and b.pinned]
            for block in blocks:
                block.pinned = False
                if block.ref_count == 0 and block.alive:
                    self.policy.add(block)
                    self.policy.schedule_expiry(block)
            self._enforce_quota(namespace)

    def pinned_blocks(self, namespace: str) -> int:
        """Blocks of the namespace pinned now."""
        with self._lock:
            return sum(1 for b in self.index.values() if b.namespace == namespace and b.pinned)

    def snapshot(self) -> tuple[int, list[CacheEvent]]:
        """Every indexed block, and the last cache event's number (``events``): a router
        that missed events rebuilds its view of this cache from it."""
        with self._lock:
            return self.index.snapshot()

    def stats(self) -> CacheStats:
        with self._lock:
            counters = self.counters.snapshot()
            pb = self.layout.page_bytes
            idle = self.index.num_idle_device
            active = self.device.num_used - idle
            device = TierStats(self.device.num_pages, self.device.num_used, pb, {
                "free": self.device.num_free, "active": active, "cached": idle},
                dtype_name(self.layout.dtype))
            host = TierStats(self.host.num_pages, self.host.num_used, self.host.page_bytes, {
                "free": self.host.num_free, "offloaded": self.host.num_used},
                dtype_name(self.host_layout.dtype))
            self.shares.prune(self.clock())
            names = set(self.index.namespaces()) | set(counters.prompts) | self.shares.namespaces()
            cached_bytes = {ns: self._ns_bytes(ns) for ns in names}
            fair = {t: self.shares.fair_pages(t) for t in TIERS}
            share_stats = {ns: self._share_stats(ns, fair) for ns in names}
            share_summary = ShareSummary(self.shares.enabled, self.shares.window_s,
                                         len(self.shares.active()), self.shares.fallbacks)
        prompts = {ns: counters.prompts.get(ns, PromptTokens()) for ns in names}
        return CacheStats(
            device, host,
            hit_tokens=sum(p.hit for p in prompts.values()),
            miss_tokens=sum(p.miss for p in prompts.values()),
            evictions=counters.evictions,
            promotions=counters.promotions,
            demotions=counters.demotions,
            namespaces={ns: NamespaceStats(cached_bytes[ns], p.hit, p.miss, share_stats[ns])
                        for ns, p in prompts.items()},
            shares=share_summary,
            remote=self._tier_stats("shared"),
            disk=self._tier_stats("disk"),
            single_flight=counters.single_flight,
        )

    def hottest(self, namespace: str, limit: int = 10) -> list[HotPrefix]:
        """The namespace's most-hit prefixes (``stats.hottest_prefixes``): hashes, lengths,
        hits and last use, never token ids. One pass over the index under the lock."""
        with self._lock:
            return hottest_prefixes(self.index.values(), namespace, self.block_size,
                                    self.clock(), limit)

    # -- bookkeeping ----------------------------------------------------------------------
    def _tier_stats(self, name: str) -> Any:
        tier = self.remote.named(name) if self.remote is not None else None
        return tier.stats() if tier is not None else None

    def _root(self, namespace: str) -> bytes:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = root_digest(self.model_id, self.adapter_id, namespace)
        return root

    def _observe(self, seq: CacheSeq, hashes: list[bytes], now: float) -> None:
        """Show the duel this prompt once, however often it is matched before it runs."""
        if self.policy.duel is None or seq.seq_id in self._observed:
            return
        self._observed[seq.seq_id] = None
        if len(self._observed) > 4096:
            self._observed.popitem(last=False)
        threshold = self.policy.duel.threshold
        self.policy.observe([(h, seq.ttl_for_block(i, self.block_size, self.default_ttl_s))
                             for i, h in enumerate(hashes) if sampled(h, threshold)], now)

    def _share_stats(self, namespace: str, fair: dict[Tier, int]) -> NamespaceShare:
        pb = {DEVICE: self.device.page_bytes, HOST: self.host.page_bytes}
        sh = self.shares
        return NamespaceShare(
            active=sh.is_active(namespace),
            share_bytes={t: sh.share_pages(namespace, t, fair[t]) * pb[t] for t in TIERS},
            used_bytes={t: sh.held(namespace, t) * pb[t] for t in TIERS},
            evicted_by_others={t: sh.evicted_by_others[t].get(namespace, 0) for t in TIERS},
            reserved_bytes={t: (sh.reserved_pages(namespace, t) or 0) * pb[t] for t in TIERS},
        )

    def _ns_bytes(self, namespace: str) -> int:
        return self.index.num_blocks(namespace) * self.layout.page_bytes

    def _live(self, block_hash: bytes, now: float) -> Block | None:
        """The block indexed under ``block_hash`` unless it expired (then it is dropped)."""
        block = self.index.get(block_hash)
        if block is not None and is_expired(block, now):
            self.counters.evictions.ttl += len(self.index.drop(block))
            return None
        return block

    def _reuse(self, block: Block, own_page: int, ttl_s: float) -> None:
        """Reference a block another sequence indexed first; a host one adopts ``own_page``."""
        self.index.ref(block)
        if block.tier == HOST:  # the sequence's fresh device page holds the same KV: no copy
            self.index.move(block, DEVICE, own_page)
        block.hits += 1
        block.ttl_s = max(block.ttl_s, ttl_s)

    def _insert(self, seq: CacheSeq, pos: int, block_hash: bytes, parent: Block | None,
                tokens: bytes, page: int | torch.Tensor) -> Block | None:
        """Index block ``pos`` of ``seq``'s prompt, held by ``seq``. ``page``: the device page
        the sequence computed it in, or its KV as a CPU page of the host's layout (a fetched
        block), copied into a device page taken for it. None, nothing indexed, when the
        namespace's quota cannot fit it or no device page can be freed. It is pinned when a
        pin names its hash and its parent is pinned too."""
        if not self._enforce_quota(seq.namespace, extra_blocks=1):
            return None
        if isinstance(page, torch.Tensor):
            if not self.tiers.reserve_device(1, seq.namespace):
                return None
            kv, page = page, self.device.take(seq.namespace)
            self.device.tensor[page].copy_(
                convert_pages(self.host.layout, self.device.layout, kv[None])[0])
        ttl_s = seq.ttl_for_block(pos, self.block_size, self.default_ttl_s)
        pinned = (parent is None or parent.pinned) and self.policy.is_pinned(seq.namespace,
                                                                             block_hash)
        return self.index.insert(block_hash, parent, seq.namespace, tokens, page, ttl_s, pinned)

    def _enforce_quota(self, namespace: str, extra_blocks: int = 0) -> bool:
        """Drop the namespace's own idle blocks until it (plus ``extra_blocks``) fits its quota.

        False when only active or pinned blocks are left and it still does not fit.
        """
        extra = extra_blocks * self.layout.page_bytes
        while self.policy.over_quota(namespace, self._ns_bytes(namespace) + extra):
            victim = self.policy.namespace_victim(namespace)
            if victim is None:
                return False
            self.counters.evictions.quota += len(self.index.drop(victim))
        return True

    def _expire(self, now: float) -> None:
        self.policy.now = now
        due = [b for b in self.policy.pop_expired(now) if b.alive]
        for block in due:
            self.counters.evictions.ttl += len(self.index.drop(block))
