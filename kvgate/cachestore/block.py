"""The plain records the store hands around: a cached block, a sequence, a match result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

Tier = Literal["device", "host"]
BlockState = Literal["active", "cached", "offloaded"]

DEVICE: Final = "device"
HOST: Final = "host"
TIERS: Final[tuple[Tier, Tier]] = (DEVICE, HOST)


@dataclass(eq=False)  # identity semantics: blocks live in sets and ordered dicts
class Block:
    """One full block of a prefix, in the index, on one tier.

    ``tokens`` (little-endian u32 bytes) is kept so a hit can be verified; ``parent`` makes
    the chain explicit, so a match checks identity of the whole prefix, not only a hash.
    ``tier`` and ``page`` change only through the index (``PrefixIndex.move``), which
    keeps the count of idle device blocks true.
    """

    hash: bytes
    parent: Block | None
    namespace: str
    tokens: bytes
    depth: int
    tier: Tier
    page: int
    ttl_s: float
    expires_at: float = 0.0
    ref_count: int = 0
    hits: int = 0  # reuses since indexed: what moves it to the protected segment
    pinned: bool = False
    alive: bool = True
    handed: int = 0  # bit i: handed to the store's tier i below the host (written, or read
    # from it or a tier above it; ``remote_link``)
    fetched: str = ""  # the tier it was fetched from ("disk", "shared") while not yet
    # matched: its first hit is reported as a hit there
    children: set[Block] = field(default_factory=set)

    @property
    def state(self) -> BlockState:
        if self.tier == HOST:
            return "offloaded"
        return "active" if self.ref_count > 0 else "cached"


@dataclass
class CacheSeq:
    """One request's view of the cache: its device pages in order and the blocks it holds.

    ``blocks[i]`` is the indexed block of position ``i`` (referenced by this sequence). If
    another sequence indexed the same block first, ``block_table[i]`` is this sequence's
    own (private) copy of the page, freed on release.
    """

    seq_id: str
    namespace: str
    ttl_segments: list[tuple[int, float]] = field(default_factory=list)
    default_ttl_s: float | None = None
    block_table: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    blocks: list[Block] = field(default_factory=list)
    chain_broken: bool = False  # a block could not be indexed: later ones have no parent
    # Blocks this sequence wrote to the cache (``CacheStore.commit``), in order: (chain
    # hash, TTL seconds). Blocks reused from another sequence's are not among them.
    written: list[tuple[bytes, float]] = field(default_factory=list)
    # Hashes of the blocks it computes and has not committed yet, from block
    # ``computing_from`` on (``CacheStore.announce``): what waiting requests may wait for.
    computing: list[bytes] = field(default_factory=list)
    computing_from: int = 0

    def ttl_for_block(self, index: int, block_size: int, store_default: float) -> float:
        end = (index + 1) * block_size
        for end_token, ttl_s in self.ttl_segments:
            if end_token >= end:
                return float(ttl_s)
        return float(self.default_ttl_s if self.default_ttl_s is not None else store_default)


@dataclass(frozen=True)
class PrefixMatch:
    """What a prompt found: the leading ``num_blocks`` blocks are now in the block table.

    ``device_hits`` were already on the device; ``host_hits`` were promoted (copied into
    fresh device pages) by the match itself, so the engine can use all of them at once.
    A block fetched from a tier below the host for this request is on the device by then;
    its first match reports that tier (``disk`` or ``shared``).
    """

    num_cached_tokens: int
    num_blocks: int
    device_hits: int
    host_hits: int
    # Per matched block, in order: (chain hash, where it was found: device, host, disk, shared)
    blocks: tuple[tuple[bytes, str], ...] = ()
