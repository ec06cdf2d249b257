"""Block hashes: the identity of a cached prefix.

``hash(block i) = xxh3_128(parent_digest ‖ token ids of block i as little-endian u32)``,
so a block's hash names its whole prefix, not just its own tokens. The first parent is a
root digest of the domain tag, model id, adapter id and namespace, each length-prefixed:
two tenants (or two models) can never produce the same chain, and no field can run into
the next one (``("ab", "c")`` and ``("a", "bc")`` give different roots).

The hash is fast, not cryptographic: the index keeps every block's tokens and verifies
them on a hit, so a collision costs a miss and never a wrong block.

Speed: a 128k-token prompt is 8192 blocks. The token ids are converted to bytes once
(vectorised), and the loop only slices ``bytes`` and calls the C hash, which is what a
chained hash allows (block i needs block i-1's digest).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Sequence

import numpy as np
import torch
import xxhash

HashFn = Callable[[bytes], bytes]
TokenIds = Sequence[int] | np.ndarray | torch.Tensor

DOMAIN_TAG = b"kvgate/prefix-block/v1"
DIGEST_BYTES = 16
TOKEN_BYTES = 4  # every token id is hashed and stored as a little-endian u32

xxh3_128 = xxhash.xxh3_128_digest


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


def root_digest(model_id: str, adapter_id: str, namespace: str) -> bytes:
    """The parent of block 0: separates models, adapters and namespaces completely."""
    parts = [DOMAIN_TAG, model_id.encode(), adapter_id.encode(), namespace.encode()]
    return xxh3_128(b"".join(_field(p) for p in parts))


def token_bytes(token_ids: TokenIds) -> bytes:
    """Token ids as little-endian u32 bytes, converted in one vectorised step.

    Lists go through ``array('I')`` (about 3x faster than numpy on Python ints); arrays and
    tensors through numpy. Ids outside ``[0, 2**32)`` raise instead of wrapping silently.
    """
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    if isinstance(token_ids, np.ndarray):
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= 2**32):
            raise ValueError("token ids must be in [0, 2**32)")
        return np.ascontiguousarray(token_ids, dtype="<u4").tobytes()
    packed = array("I", token_ids)
    if packed.itemsize != TOKEN_BYTES:  # pragma: no cover - platforms with 2-byte 'I'
        return np.asarray(token_ids, dtype="<u4").tobytes()
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def chain_hashes(
    parent: bytes, data: bytes, block_size: int, hash_fn: HashFn = xxh3_128
) -> list[bytes]:
    """Digests of every full block in ``data`` (token bytes), chained from ``parent``.

    A trailing partial block is ignored: only full blocks are ever cached.
    """
    step = block_size * TOKEN_BYTES
    end = len(data) - len(data) % step
    out: list[bytes] = []
    append = out.append
    for off in range(0, end, step):
        parent = hash_fn(parent + data[off : off + step])
        append(parent)
    return out


def block_hashes(
    parent: bytes,
    token_ids: TokenIds,
    block_size: int,
    hash_fn: HashFn = xxh3_128,
) -> list[bytes]:
    """Hash a whole prompt in one call: the digest of each of its full blocks."""
    return chain_hashes(parent, token_bytes(token_ids), block_size, hash_fn)
