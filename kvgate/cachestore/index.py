"""The prefix index: every cached block, by hash, as chains that start at a namespace's root.

The cache's bookkeeping (as vLLM v1's ``block_pool``): ``hash → block``, each block's token
ids, page and reference count. What to evict is the policy's call; the index tells it which
blocks are candidates (a block whose count drops to zero; a chain deepest first). ``verify``
(same parent object, namespace and token bytes) is the one rule that an indexed block is a
given prefix's: ``walk``, and through it ``match`` and ``pin``, and ``commit`` go through
it, so a collision costs a miss, never a wrong block. ``drop`` takes a block's descendants
too (nothing could reach them) and gives pages back; ``move`` puts a block on a page the
caller copied it to.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Sequence, ValuesView

from kvgate.cachestore.block import DEVICE, HOST, Block, Tier
from kvgate.cachestore.events import CacheEvent, CacheEventSink, EventKind
from kvgate.cachestore.hashing import TOKEN_BYTES
from kvgate.cachestore.policy import EvictionPolicy
from kvgate.cachestore.pool import PagePool


class PrefixIndex:
    def __init__(self, device: PagePool, host: PagePool, policy: EvictionPolicy) -> None:
        self.block_bytes = device.layout.block_size * TOKEN_BYTES  # token bytes of one block
        self.policy = policy
        self._pools: dict[Tier, PagePool] = {DEVICE: device, HOST: host}
        self._blocks: dict[bytes, Block] = {}
        self._ns_blocks: dict[str, int] = {}
        self.num_idle_device = 0  # device blocks with refcount 0 ("cached")
        self.on_event: CacheEventSink | None = None  # stored / removed / moved (events.py)
        self.event_seq = 0  # the last event's number

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def get(self, block_hash: bytes) -> Block | None:
        """The block indexed under this hash, whichever prefix it belongs to (see ``verify``)."""
        return self._blocks.get(block_hash)

    def values(self) -> ValuesView[Block]:
        return self._blocks.values()

    def items(self) -> ItemsView[bytes, Block]:
        return self._blocks.items()

    def num_blocks(self, namespace: str) -> int:
        """Indexed blocks of the namespace, both tiers, any state (what quota counts)."""
        return self._ns_blocks.get(namespace, 0)

    def namespaces(self) -> list[str]:
        """Namespaces holding at least one indexed block."""
        return list(self._ns_blocks)

    def tokens_of(self, data: bytes, position: int) -> bytes:
        """Token bytes of the block at ``position`` of a prompt given as token bytes."""
        return data[position * self.block_bytes : (position + 1) * self.block_bytes]

    @staticmethod
    def verify(block: Block, parent: Block | None, namespace: str, tokens: bytes) -> bool:
        """Is ``block`` the block that follows ``parent`` with these tokens in ``namespace``?

        The hash only names a candidate; the parent object, the namespace and the token
        bytes are what a hit must agree on.
        """
        return block.parent is parent and block.namespace == namespace and block.tokens == tokens

    def walk(self, namespace: str, hashes: Sequence[bytes], data: bytes) -> Iterator[Block]:
        """The prompt's blocks in the index, from its root, each verified; stops at the first miss.

        ``hashes`` are the chained hashes of ``data`` (the prompt's token bytes) from the
        namespace's root digest.
        """
        parent: Block | None = None
        for i, block_hash in enumerate(hashes):
            block = self._blocks.get(block_hash)
            if block is None or not self.verify(block, parent, namespace, self.tokens_of(data, i)):
                return
            yield block
            parent = block

    # -- changing ----------------------------------------------------------------------------
    def insert(
        self, block_hash: bytes, parent: Block | None, namespace: str, tokens: bytes, page: int,
        ttl_s: float, pinned: bool,
    ) -> Block:
        """Index a freshly written device page; the writing sequence holds its one reference."""
        depth = 0 if parent is None else parent.depth + 1
        block = Block(block_hash, parent, namespace, bytes(tokens), depth, DEVICE, page, ttl_s,
                      ref_count=1, pinned=pinned)
        self._blocks[block_hash] = block
        if parent is not None:
            parent.children.add(block)
        self._ns_blocks[namespace] = self._ns_blocks.get(namespace, 0) + 1
        self._emit("stored", block, DEVICE)
        return block

    def ref(self, block: Block) -> None:
        """One more sequence uses ``block``: it is active, no longer an eviction candidate."""
        if block.ref_count == 0:
            self.policy.remove(block)
            if block.tier == DEVICE:
                self.num_idle_device -= 1
        block.ref_count += 1

    def unref(self, blocks: Sequence[Block], now: float | None = None) -> list[Block]:
        """One reference less on each block; those left idle become candidates, deepest first.

        With ``now`` (a sequence's release: its last use), every block expires ``ttl_s``
        from then; without it (a match reference handed back unused) expiries stay.
        → the blocks left idle.
        """
        idle: list[Block] = []
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError("refcount below zero: a sequence was released twice")
            if now is not None:
                block.expires_at = now + block.ttl_s
            if block.ref_count == 0:
                if block.tier == DEVICE:
                    self.num_idle_device += 1
                idle.append(block)
                self.policy.schedule_expiry(block)
        self.policy.add_released(idle)
        return idle

    def move(self, block: Block, tier: Tier, page: int) -> None:
        """``block`` now lives in ``page`` of ``tier`` (copied there); its old page goes back."""
        self._pools[block.tier].give_back(block.page)
        if block.ref_count == 0 and block.tier != tier:
            self.num_idle_device += 1 if tier == DEVICE else -1
        moved = block.tier != tier
        block.tier, block.page = tier, page
        if moved:
            self._emit("moved", block, tier)

    def drop(self, block: Block) -> list[Block]:
        """Remove ``block`` and its descendants (all idle), freeing their pages; → those removed."""
        dropped: list[Block] = []
        stack = [block]
        while stack:
            b = stack.pop()
            if not b.alive:
                continue
            if b.ref_count:
                raise RuntimeError("an active block cannot be dropped")
            stack.extend(b.children)
            b.alive = False  # before the policy hears of it: a dead block leaves a ghost
            b.children = set()
            self.policy.remove(b)
            if self._blocks.get(b.hash) is b:
                del self._blocks[b.hash]
                self._emit("removed", b, b.tier)  # what a router's view holds goes with it
            if b.parent is not None:
                b.parent.children.discard(b)
            if b.tier == DEVICE:
                self.num_idle_device -= 1
            self._pools[b.tier].give_back(b.page)
            self._ns_blocks[b.namespace] -= 1
            if not self._ns_blocks[b.namespace]:
                del self._ns_blocks[b.namespace]
            dropped.append(b)
        return dropped

    # -- events ------------------------------------------------------------------------------
    def _emit(self, kind: EventKind, block: Block, tier: Tier) -> None:
        self.event_seq += 1
        if self.on_event is not None:
            self.on_event(CacheEvent(self.event_seq, kind, block.namespace, block.hash, tier))

    def snapshot(self) -> tuple[int, list[CacheEvent]]:
        """Every indexed block as a ``stored`` event, with the number of the last event
        emitted before: events after it are what a consumer applies on top (the caller
        holds the store's lock, so nothing changes in between)."""
        seq = self.event_seq
        return seq, [CacheEvent(seq, "stored", b.namespace, b.hash, b.tier)
                     for b in self._blocks.values()]
