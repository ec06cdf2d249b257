"""One block as the tiers below the host store it: its identity, its page, and how it is
checked on the way back. The remote tier (Valkey) and the disk tier use the same record.

A record (``RecordCodec.encode``) is a header (magic, namespace and token lengths, the
namespace's epoch), the layout signature (model id, page shape and dtype: a page of another
model or KV dtype never verifies), the parent's chain hash, the namespace, the block's token
ids and the page's raw bytes, and with a secret an HMAC-SHA256 of all of it. ``decode``
accepts it only where every field equals what the prompt being served expects (the rule of
``PrefixIndex.verify``): a collision, a truncated or corrupt record, another model's page or
another tenant's record copied under this key is a miss, never a wrong page.

Pages are read back with ``KVLayout.page_from_bytes``: a quantized page is a row of bytes,
a plain one a row of the layout's dtype; the record holds its bytes either way.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import torch

from kvgate.cachestore.hashing import xxh3_128
from kvgate.kernels.layout import KVLayout

MAGIC = b"KVS1"
HEADER = struct.Struct("<4sIIQ")  # magic, namespace bytes, token bytes, namespace epoch
DIGEST = 16
MAC_BYTES = 32


def layout_signature(layout: KVLayout, model_id: str) -> bytes:
    """What a page's bytes mean: a page of another model, dtype or shape never verifies."""
    return xxh3_128(f"{model_id}|{layout.signature()}".encode())


@dataclass(frozen=True)
class RemoteRecord:
    """One block to write: its identity, its page (a CPU tensor) and its TTL."""

    block_hash: bytes
    parent_hash: bytes
    namespace: str
    tokens: bytes
    page: torch.Tensor
    ttl_s: float


@dataclass(frozen=True)
class FetchedBlock:
    block_hash: bytes
    tokens: bytes
    page: torch.Tensor  # CPU, as the pool stores a page (``KVLayout.storage_page_shape``)


@dataclass
class RemoteFetch:
    """Blocks fetched for one prompt: positions ``start``, ``start + 1``, ... in order.
    ``sources[i]`` names the tier block ``i`` came from (``disk``, ``shared``)."""

    start: int
    blocks: list[FetchedBlock]
    sources: list[str] | None = None

    def source(self, i: int) -> str:
        return self.sources[i] if self.sources is not None else "shared"


@dataclass(frozen=True)
class RecordHead:
    """What a record says about itself, without its page (the disk tier's start-up scan)."""

    namespace: str
    epoch: int
    signature: bytes


class RecordCodec:
    def __init__(self, layout: KVLayout, model_id: str, secret: bytes = b"") -> None:
        self.layout = layout
        self.signature = layout_signature(layout, model_id)
        self.secret = secret

    def encode(self, record: RemoteRecord, epoch: int = 0) -> bytes:
        ns = record.namespace.encode()
        page = record.page.contiguous().view(torch.uint8).numpy().tobytes()
        body = b"".join((HEADER.pack(MAGIC, len(ns), len(record.tokens), epoch), self.signature,
                         record.parent_hash, ns, record.tokens, page))
        return body + self.mac(body) if self.secret else body

    def decode(self, value: bytes | None, parent_hash: bytes, namespace: str,
               tokens: bytes, epoch: int = 0) -> torch.Tensor | None:
        """The page stored in ``value`` if it is exactly this block; else None (a miss)."""
        if value is None:
            return None
        if self.secret:
            body, mac = value[:-MAC_BYTES], value[-MAC_BYTES:]
            if len(value) < MAC_BYTES or not hmac.compare_digest(mac, self.mac(body)):
                return None
        else:
            body = value
        ns = namespace.encode()
        head = HEADER.size + DIGEST + DIGEST
        if len(body) != head + len(ns) + len(tokens) + self.layout.page_bytes:
            return None
        magic, ns_len, tok_len, written_epoch = HEADER.unpack_from(body)
        if magic != MAGIC or ns_len != len(ns) or tok_len != len(tokens) or \
                written_epoch != epoch:
            return None
        pos = HEADER.size
        if body[pos:pos + DIGEST] != self.signature:
            return None
        pos += DIGEST
        if body[pos:pos + DIGEST] != parent_hash:
            return None
        pos += DIGEST
        if body[pos:pos + ns_len] != ns or body[pos + ns_len:pos + ns_len + tok_len] != tokens:
            return None
        return self.layout.page_from_bytes(memoryview(body)[pos + ns_len + tok_len:])

    @staticmethod
    def head(body: bytes) -> RecordHead | None:
        """The namespace, epoch and signature a record's first bytes name; None when they
        are not a record's (``body`` may stop anywhere after the namespace)."""
        if len(body) < HEADER.size + 2 * DIGEST:
            return None
        magic, ns_len, _, epoch = HEADER.unpack_from(body)
        pos = HEADER.size + 2 * DIGEST
        if magic != MAGIC or len(body) < pos + ns_len:
            return None
        try:
            namespace = body[pos:pos + ns_len].decode()
        except UnicodeDecodeError:
            return None
        return RecordHead(namespace, epoch, body[HEADER.size:HEADER.size + DIGEST])

    def mac(self, body: bytes) -> bytes:
        return hmac.new(self.secret, body, hashlib.sha256).digest()
