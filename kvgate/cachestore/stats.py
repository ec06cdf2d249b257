"""A consistent snapshot of the cache, taken under the store's lock and safe to hand around.

The store keeps running counters (``counters.CacheCounters``); ``CacheStats`` is a frozen
view over a copy of them, so readers on other threads (the admin endpoint, the metrics
scrape) never see a half-updated store.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvgate.cachestore.block import Block
from kvgate.cachestore.counters import Evictions, PageMoves, SingleFlight

JSON = dict[str, object]


@dataclass(frozen=True)
class TierStats:
    capacity_pages: int
    used_pages: int
    page_bytes: int
    blocks: dict[str, int]  # state -> pages (device: free/active/cached, host: free/offloaded)
    kv_dtype: str = ""  # what the tier's pages store K/V as: float32, bfloat16, fp8, int8...

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def as_dict(self) -> JSON:
        return {
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
            "capacity_pages": self.capacity_pages,
            "used_pages": self.used_pages,
            "page_bytes": self.page_bytes,
            "kv_dtype": self.kv_dtype,
            "blocks": dict(self.blocks),
        }


@dataclass(frozen=True)
class NamespaceShare:
    """One namespace's guaranteed share (``kvgate.cachestore.shares``), by tier.

    ``share_bytes`` is what is protected now (its reservation; else, with fair shares, its
    fair share while active; else 0), ``reserved_bytes`` its reservation (0: none),
    ``used_bytes`` the pages it holds (indexed blocks and, on the device, its running
    sequences' pages), ``evicted_by_others`` blocks that left the tier for another
    namespace's allocation since the store started.
    """

    active: bool
    share_bytes: dict[str, int]
    used_bytes: dict[str, int]
    evicted_by_others: dict[str, int]
    reserved_bytes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> JSON:
        return {
            "active": self.active,
            "share_bytes": dict(self.share_bytes),
            "used_bytes": dict(self.used_bytes),
            "evicted_by_others": dict(self.evicted_by_others),
            "reserved_bytes": dict(self.reserved_bytes),
        }


@dataclass(frozen=True)
class ShareSummary:
    """Shares on or off, the activity window, how many namespaces are active (the fair
    share's divisor) and how many protected blocks went because nothing else could."""

    enabled: bool
    window_s: float
    active_namespaces: int
    fallbacks: int

    def as_dict(self) -> JSON:
        return {
            "enabled": self.enabled,
            "window_s": self.window_s,
            "active_namespaces": self.active_namespaces,
            "fallbacks": self.fallbacks,
        }


@dataclass(frozen=True)
class NamespaceStats:
    """One namespace: what it holds and how its prompts were served.

    ``hit_tokens`` are prompt tokens served from the cache, ``miss_tokens`` prompt tokens
    computed, cache writes included; both as billed (``CacheStore.record_prompt``), so
    their sum is the namespace's billed prompt tokens.
    """

    cached_bytes: int  # bytes of this namespace's indexed blocks, both tiers (what quota counts)
    hit_tokens: int
    miss_tokens: int
    share: NamespaceShare | None = None

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def as_dict(self) -> JSON:
        out: JSON = {
            "cached_bytes": self.cached_bytes,
            "hit_tokens": self.hit_tokens,
            "miss_tokens": self.miss_tokens,
            "hit_rate": self.hit_rate,
        }
        if self.share is not None:
            out.update(self.share.as_dict())
        return out


@dataclass(frozen=True)
class RemoteTierStats:
    """The remote (Valkey) tier as this replica sees it; blocks unless named bytes.

    ``misses``: fetches that stopped at a block Valkey does not hold; ``rejected``: ones
    that stopped at an entry that failed verification; ``skipped``: fetches the cost model
    declined; ``dropped``: blocks not written (queue full, breaker open, write error).
    """

    available: bool  # the breaker is closed
    queued_bytes: int
    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    rejected: int = 0
    skipped: int = 0
    writes: int = 0
    write_bytes: int = 0
    dropped: int = 0
    errors: int = 0

    def as_dict(self) -> JSON:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DiskTierStats:
    """The local disk tier; blocks unless named bytes.

    ``misses``: fetches that stopped at a block the disk does not hold (or whose TTL had
    passed: also ``expired``); ``rejected``: at a record that failed verification (corrupt,
    truncated, another layout, another tenant; its file is deleted); ``dropped``: blocks not
    written (queue full, write error, too large); ``evicted``: records deleted to keep
    ``capacity_bytes``; ``errors``: reads and writes the file system refused (a miss each).
    """

    available: bool  # the last file operation succeeded
    capacity_bytes: int
    used_bytes: int
    files: int
    queued_bytes: int
    hits: int = 0
    hit_bytes: int = 0
    misses: int = 0
    rejected: int = 0
    expired: int = 0
    skipped: int = 0
    writes: int = 0
    write_bytes: int = 0
    dropped: int = 0
    evicted: int = 0
    errors: int = 0

    def as_dict(self) -> JSON:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CacheStats:
    """The whole cache at one moment.

    ``hit_tokens`` (prompt tokens served from the cache) and ``miss_tokens`` (prompt tokens
    computed, cache writes included) are the sums over ``namespaces``: hit + miss is every
    prompt token billed since the store started.
    """

    device: TierStats
    host: TierStats
    hit_tokens: int
    miss_tokens: int
    evictions: Evictions
    promotions: PageMoves
    demotions: PageMoves
    namespaces: dict[str, NamespaceStats] = field(default_factory=dict)
    shares: ShareSummary | None = None
    remote: RemoteTierStats | None = None  # the Valkey tier, when configured
    disk: DiskTierStats | None = None  # the local disk tier, when configured
    single_flight: SingleFlight = field(default_factory=SingleFlight)

    @property
    def blocks(self) -> dict[str, int]:
        """Pages by life-cycle state over both tiers."""
        return {
            "free": self.device.blocks["free"],
            "active": self.device.blocks["active"],
            "cached": self.device.blocks["cached"],
            "offloaded": self.host.blocks["offloaded"],
        }

    def as_dict(self) -> JSON:
        """The JSON body of ``GET /admin/cache/stats``."""
        return {
            "device": self.device.as_dict(),
            "host": self.host.as_dict(),
            "blocks": self.blocks,
            "hit_tokens": self.hit_tokens,
            "miss_tokens": self.miss_tokens,
            "evictions": self.evictions.as_dict(),
            "promotions": self.promotions.as_dict(),
            "demotions": self.demotions.as_dict(),
            "namespaces": {ns: s.as_dict() for ns, s in sorted(self.namespaces.items())},
            "shares": self.shares.as_dict() if self.shares is not None else None,
            "shared": self.remote.as_dict() if self.remote is not None else None,
            "disk": self.disk.as_dict() if self.disk is not None else None,
            "single_flight": self.single_flight.as_dict(),
        }


@dataclass(frozen=True)
class HotPrefix:
    """One cached prefix of a namespace, never its text: the hash of its last block (which
    names the whole chain), its length in tokens, the hits on that block, its tier, and
    how long ago it was last used (0 while a running request holds it)."""

    hash: str
    tokens: int
    hits: int
    tier: str
    idle_s: float

    def as_dict(self) -> JSON:
        return {"hash": self.hash, "tokens": self.tokens, "hits": self.hits,
                "tier": self.tier, "idle_s": round(self.idle_s, 3)}


def hottest_prefixes(blocks: Iterable[Block], namespace: str, block_size: int, now: float,
                     limit: int) -> list[HotPrefix]:
    """The namespace's ``limit`` prefixes with the most hits, longest first among equals.

    A block whose child has as many hits is left out: every hit on the child was a hit on
    it too, so the child's longer prefix says more. Last use is the block's last release
    (its expiry less its TTL, as ``PrefixIndex.unref`` sets it)."""
    candidates = (
        b for b in blocks
        if b.alive and b.namespace == namespace and b.hits > 0
        and not any(c.alive and c.hits >= b.hits for c in b.children))
    top = heapq.nlargest(limit, candidates, key=lambda b: (b.hits, b.depth))
    return [HotPrefix(hash=b.hash.hex(), tokens=(b.depth + 1) * block_size, hits=b.hits,
                      tier=b.tier,
                      idle_s=0.0 if b.ref_count > 0 else max(0.0, now - (b.expires_at - b.ttl_s)))
            for b in top]
