"""The prefix cache: block hashing, index, device and host page pools, eviction policy."""

from cachestore.block import Block, CacheSeq, PrefixMatch, ttl_class
from cachestore.hashing import block_hashes, root_digest, token_bytes
from cachestore.pool import PagePool, copy_pages
from cachestore.stats import CacheStats, NamespaceStats, TierStats
from cachestore.store import CacheStore

__all__ = [
    "Block",
    "CacheSeq",
    "CacheStats",
    "CacheStore",
    "NamespaceStats",
    "PagePool",
    "PrefixMatch",
    "TierStats",
    "block_hashes",
    "copy_pages",
    "root_digest",
    "token_bytes",
    "ttl_class",
]
