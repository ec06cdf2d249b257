"""The prefix cache: block hashing, index, device and host page pools, eviction policy."""

from kvgate.cachestore.block import Block, CacheSeq, PrefixMatch
from kvgate.cachestore.counters import CacheCounters, Evictions, PageMoves, PromptTokens
from kvgate.cachestore.hashing import block_hashes, root_digest, token_bytes
from kvgate.cachestore.index import PrefixIndex
from kvgate.cachestore.pool import PagePool, copy_pages
from kvgate.cachestore.shares import Shares
from kvgate.cachestore.stats import (
    CacheStats,
    NamespaceShare,
    NamespaceStats,
    ShareSummary,
    TierStats,
)
from kvgate.cachestore.store import CacheStore

__all__ = [
    "Block",
    "CacheCounters",
    "CacheSeq",
    "CacheStats",
    "CacheStore",
    "Evictions",
    "NamespaceShare",
    "NamespaceStats",
    "PageMoves",
    "PagePool",
    "PrefixIndex",
    "PrefixMatch",
    "PromptTokens",
    "ShareSummary",
    "Shares",
    "TierStats",
    "block_hashes",
    "copy_pages",
    "root_digest",
    "token_bytes",
]
