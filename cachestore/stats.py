"""A consistent snapshot of the cache, taken under the store's lock and safe to hand around.

The store keeps running counters; ``CacheStats`` is a frozen copy so readers on other
threads (the admin endpoint, the metrics scrape) never see a half-updated store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVICTION_REASONS = ("lru", "ttl", "quota")


@dataclass(frozen=True)
class TierStats:
    capacity_pages: int
    used_pages: int
    page_bytes: int
    blocks: dict[str, int]  # state -> pages (device: free/active/cached, host: free/offloaded)

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
            "capacity_pages": self.capacity_pages,
            "used_pages": self.used_pages,
            "blocks": dict(self.blocks),
        }


@dataclass(frozen=True)
class NamespaceStats:
    cached_bytes: int  # bytes of this namespace's indexed blocks, both tiers (what quota counts)
    hit_tokens: int
    miss_tokens: int

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cached_bytes": self.cached_bytes,
            "hit_tokens": self.hit_tokens,
            "miss_tokens": self.miss_tokens,
            "hit_rate": self.hit_rate,
        }


@dataclass(frozen=True)
class CacheStats:
    device: TierStats
    host: TierStats
    hit_tokens: int
    miss_tokens: int
    evictions: dict[str, int]
    promotions: dict[str, int]  # {"count", "bytes"}
    demotions: dict[str, int]
    namespaces: dict[str, NamespaceStats] = field(default_factory=dict)

    @property
    def blocks(self) -> dict[str, int]:
        """Pages by life-cycle state over both tiers."""
        return {
            "free": self.device.blocks["free"],
            "active": self.device.blocks["active"],
            "cached": self.device.blocks["cached"],
            "offloaded": self.host.blocks["offloaded"],
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON body of ``GET /admin/cache/stats``."""
        return {
            "device": self.device.as_dict(),
            "host": self.host.as_dict(),
            "blocks": self.blocks,
            "hit_tokens": self.hit_tokens,
            "miss_tokens": self.miss_tokens,
            "evictions": dict(self.evictions),
            "promotions": dict(self.promotions),
            "demotions": dict(self.demotions),
            "namespaces": {ns: s.as_dict() for ns, s in sorted(self.namespaces.items())},
        }
