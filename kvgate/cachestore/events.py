"""Cache events: what a router needs to know to keep an exact index of this cache.

The index reports every block it stores, removes or moves between tiers to one optional
sink (``PrefixIndex.on_event``). The sink is called on the thread that changes the index,
under the store's lock, so it must only record the event (append to a buffer); sending it
anywhere is the caller's business (``kvgate.gateway.protocol.wire``). Hashes are the chained,
namespace-scoped block hashes (``kvgate.cachestore.hashing``), so a consumer that computes the
same hashes for a prompt can look its prefix up without ever seeing a token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kvgate.cachestore.block import Tier

EventKind = Literal["stored", "removed", "moved"]


@dataclass(frozen=True)
class CacheEvent:
    """``seq`` numbers the index's events from 1 without gaps: a consumer that sees a gap
    missed something and must start over from a snapshot (``PrefixIndex.snapshot``)."""

    seq: int
    kind: EventKind
    namespace: str
    block_hash: bytes
    tier: Tier  # where the block is now (for ``removed``: where it was)


CacheEventSink = Callable[[CacheEvent], None]
