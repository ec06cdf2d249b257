"""How the store uses the tiers below the host: what it writes, fetches and adopts.

``RemoteLink`` holds an ordered list of ``LinkedTier``: the local disk (``disk_tier``)
first, then Valkey (``remote_tier``); either may be absent, each has its own cost model.

- ``write_through`` (engine thread, store lock): blocks the store indexes, and demoted
  blocks a tier never took, are copied off their pages once and queued for every tier that
  has not taken them (``Block.handed``, a bit per tier); the tiers' threads do the I/O.
- ``fetch`` (off the engine thread): the blocks after the local prefix from the first tier,
  then what it lacked from the next; the link decides how many a tier may read and whether
  reading beats recomputing, and counts the hits.
- ``adopt`` (engine thread, before the request's ``match``): fetched blocks that still
  follow the local prefix are indexed as device blocks (``CacheStore._insert``), billed as
  cache reads like any hit, and never written back to their tier or the tiers after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from kvgate.cachestore.block import DEVICE, HOST, Block, CacheSeq
from kvgate.cachestore.hashing import HashFn, TokenIds, chain_hashes, token_bytes
from kvgate.cachestore.index import PrefixIndex
from kvgate.cachestore.policy import is_expired
from kvgate.cachestore.pool import PagePool
from kvgate.cachestore.record import FetchedBlock, RemoteFetch, RemoteRecord
from kvgate.cachestore.remote_tier import CostModel
from kvgate.kernels.layout import KVLayout, convert_pages

log = logging.getLogger("kvgate.cache")


class FetchLimits(Protocol):
    """What one fetch may read from a tier (its config's fields)."""

    @property
    def max_fetch_blocks(self) -> int: ...
    @property
    def max_fetch_bytes(self) -> int: ...


class TierCounters(Protocol):
    def add(self, **deltas: int) -> None: ...


class LinkedTier(Protocol):
    """A tier below the host that ``RemoteLink`` writes through to and fetches from."""

    name: str  # how a block found there is reported: "disk", "shared"
    layout: KVLayout

    @property
    def config(self) -> FetchLimits: ...
    @property
    def counters(self) -> TierCounters: ...  # the link counts hits, skips and drops too
    def room(self) -> int: ...
    def put(self, records: Sequence[RemoteRecord]) -> int: ...
    def flush_namespace(self, namespace: str) -> None: ...
    def fetch(self, namespace: str, parent_hash: bytes, hashes: Sequence[bytes],
              tokens: Sequence[bytes]) -> list[FetchedBlock]: ...
    def stats(self) -> Any: ...
    def drain(self, timeout_s: float = 10.0) -> bool: ...
    def close(self) -> None: ...


class LinkedStore(Protocol):
    """The parts of ``CacheStore`` the link works with (the store owns the link)."""

    device: PagePool
    host: PagePool
    index: PrefixIndex
    block_size: int
    hash_fn: HashFn
    clock: Callable[[], float]

    def root_of(self, namespace: str) -> bytes: ...
    def local_prefix_blocks(self, namespace: str, hashes: list[bytes], data: bytes) -> int: ...
    def _insert(self, seq: CacheSeq, pos: int, block_hash: bytes, parent: Block | None,
                tokens: bytes, page: int | torch.Tensor) -> Block | None: ...


class RemoteLink:
    def __init__(self, store: LinkedStore, tiers: Sequence[tuple[LinkedTier, CostModel | None]]
                 = ()) -> None:
        self.store = store
        self.tiers: list[LinkedTier] = [t for t, _ in tiers]
        self.costs: list[CostModel | None] = [c for _, c in tiers]

    def add(self, tier: LinkedTier, cost: CostModel | None) -> None:
        """Append a tier: fetched from after those already linked, written like them."""
        if len(self.tiers) >= 8:
            raise ValueError("at most 8 tiers below the host")
        self.tiers.append(tier)
        self.costs.append(cost)

    def named(self, name: str) -> LinkedTier | None:
        return next((t for t in self.tiers if t.name == name), None)

    @property
    def cost(self) -> CostModel | None:
        """The first tier's cost model (one tier: its only one)."""
        return self.costs[0] if self.costs else None

    @cost.setter
    def cost(self, value: CostModel | None) -> None:
        self.costs[0] = value

    # -- engine thread, under the store's lock ---------------------------------------------
    def write_through(self, blocks: list[Block]) -> None:
        """Queue, for each tier, the blocks not yet handed to it (as many as it has room
        for); each page is copied to the CPU once, whatever the number of tiers."""
        blocks = [b for b in blocks if b.alive]
        wanted: list[list[Block]] = []
        for bit, tier in enumerate(self.tiers):
            todo = [b for b in blocks if not b.handed >> bit & 1]
            room = tier.room()
            if len(todo) > room:  # not even copied: offered again if demoted
                tier.counters.add(dropped=len(todo) - room)
                todo = todo[:room]
            wanted.append(todo)
        needed = {id(b): b for todo in wanted for b in todo}
        if not needed:
            return
        pages = self._copy(list(needed.values()))
        store = self.store
        for bit, (tier, todo) in enumerate(zip(self.tiers, wanted, strict=True)):
            if not todo:
                continue
            records = [
                RemoteRecord(b.hash, b.parent.hash if b.parent is not None
                             else store.root_of(b.namespace), b.namespace, b.tokens,
                             pages[id(b)], b.ttl_s)
                for b in todo]
            taken = tier.put(records)
            for b in todo[:taken]:
                b.handed |= 1 << bit

    def _copy(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """The blocks' pages on the CPU, by ``id(block)`` (one ``index_select`` per tier)."""
        store = self.store
        pages: dict[int, torch.Tensor] = {}
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
                copied = rows.to("cpu").unbind(0)
                pages.update(zip(map(id, group), copied, strict=True))
        return pages

    def adopt(self, seq: CacheSeq, token_ids: TokenIds, fetched: RemoteFetch) -> int:
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
        wanted: list[tuple[int, FetchedBlock, str]] = []
        for i, fb in enumerate(fetched.blocks[skip:], skip):
            pos = fetched.start + i
            if pos >= len(hashes) or fb.block_hash != hashes[pos] or \
                    fb.tokens != store.index.tokens_of(data, pos) or fb.block_hash in store.index:
                break
            wanted.append((pos, fb, fetched.source(i)))
        if not wanted:
            return 0
        names = [t.name for t in self.tiers]
        for block in local:  # hold the prefix: making room must not evict it
            store.index.ref(block)
        adopted: list[Block] = []
        try:
            parent = local[-1] if local else None
            for pos, fb, source in wanted:
                new = store._insert(seq, pos, fb.block_hash, parent, fb.tokens, fb.page)
                if new is None:
                    break
                # not written back to where it came from, nor to the tiers after it
                first = names.index(source) if source in names else 0
                new.handed = ((1 << len(names)) - 1) & ~((1 << first) - 1)
                new.fetched = source
                adopted.append(new)
                parent = new
        finally:
            store.index.unref(adopted, now=now)
            store.index.unref(local)
        return len(adopted)

    # -- any thread but the engine's ---------------------------------------------------------
    def fetch(self, namespace: str, token_ids: TokenIds) -> RemoteFetch | None:
        """The blocks after this replica's local prefix of ``token_ids``: from the first
        tier, then what it lacked from the next, and so on."""
        store = self.store
        data = token_bytes(token_ids)
        root = store.root_of(namespace)
        hashes = chain_hashes(root, data, store.block_size, store.hash_fn)
        if not hashes:
            return None
        start = store.local_prefix_blocks(namespace, hashes, data)
        if start >= len(hashes):
            return None
        tokens = [store.index.tokens_of(data, i) for i in range(start, len(hashes))]
        blocks: list[FetchedBlock] = []
        sources: list[str] = []
        for tier, cost in zip(self.tiers, self.costs, strict=True):
            at = start + len(blocks)
            if at >= len(hashes):
                break
            page_bytes = tier.layout.page_bytes
            n = min(len(hashes) - at, tier.config.max_fetch_blocks,
                    tier.config.max_fetch_bytes // page_bytes)
            if n == 0:
                continue
            if cost is not None and not cost.worth_fetching(at, n):
                tier.counters.add(skipped=1)
                continue
            parent = hashes[at - 1] if at else root
            first = len(blocks)
            try:
                got = tier.fetch(namespace, parent, hashes[at:at + n], tokens[first:first + n])
            except Exception:  # a bug in one tier is a miss there; the next is still asked
                log.exception("fetch from the %s tier failed", tier.name)
                continue
            if not got:
                continue
            tier.counters.add(hits=len(got), hit_bytes=len(got) * page_bytes)
            blocks.extend(got)
            sources.extend([tier.name] * len(got))
        return RemoteFetch(start, blocks, sources) if blocks else None
