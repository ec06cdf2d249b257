"""Block hashes: chained, little-endian u32 tokens, a root that separates every field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from kvgate.cachestore.hashing import block_hashes, root_digest, token_bytes

ROOT = root_digest("demo", "", "tenant:1")


def test_matches_the_spec_byte_for_byte() -> None:
    tokens = [1, 2, 3, 4, 0xFFFFFFFF, 6, 7, 8]
    h0 = xxhash.xxh3_128_digest(ROOT + b"".join(t.to_bytes(4, "little") for t in tokens[:4]))
    h1 = xxhash.xxh3_128_digest(h0 + b"".join(t.to_bytes(4, "little") for t in tokens[4:]))
    assert block_hashes(ROOT, tokens, 4) == [h0, h1]


def test_a_block_hash_names_its_whole_prefix() -> None:
    a = block_hashes(ROOT, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes(ROOT, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert block_hashes(ROOT, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4) == a  # partial tail ignored
    assert block_hashes(ROOT, [1, 2, 3], 4) == []


def test_root_fields_are_length_prefixed() -> None:
    assert root_digest("ab", "", "c") != root_digest("a", "", "bc")
    assert root_digest("m", "a", "") != root_digest("m", "", "a")
    assert root_digest("m", "", "tenant:1") != root_digest("m", "", "tenant:2")
    assert root_digest("m", "", "tenant:1") == root_digest("m", "", "tenant:1")


def test_lists_arrays_and_tensors_hash_alike() -> None:
    ids = list(range(1000, 1064))
    expected = block_hashes(ROOT, ids, 16)
    assert block_hashes(ROOT, np.array(ids, dtype=np.int64), 16) == expected
    assert block_hashes(ROOT, torch.tensor(ids), 16) == expected
    assert len(expected) == 4 and len(set(expected)) == 4


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_ids_outside_u32_are_refused(bad: list[int]) -> None:
    with pytest.raises((ValueError, OverflowError)):
        token_bytes(bad)
    with pytest.raises(ValueError):
        token_bytes(np.array(bad, dtype=np.int64))


def test_128k_tokens_in_one_call() -> None:
    ids = np.random.default_rng(0).integers(0, 150_000, 131072)
    hashes = block_hashes(ROOT, ids, 16)
    assert len(hashes) == 8192 and len(set(hashes)) == 8192
