"""The prefix cache: block hashing, index, device and host page pools, eviction policy."""

from cachestore.block import Block, CacheSeq, PrefixMatch
from cachestore.counters import CacheCounters, Evictions, PageMoves, PromptTokens
from cachestore.hashing import block_hashes, root_digest, token_bytes
from cachestore.index import PrefixIndex
from cachestore.pool import PagePool, copy_pages
from cachestore.shares import Shares
from cachestore.stats import CacheStats, NamespaceShare, NamespaceStats, ShareSummary, TierStats
from cachestore.store import CacheStore

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
