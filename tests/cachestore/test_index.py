"""The prefix index alone: the verify every hit goes through, walks, references, drops."""

from __future__ import annotations

import pytest

from kvgate.cachestore.block import DEVICE, HOST, Block
from kvgate.cachestore.hashing import block_hashes, root_digest, token_bytes
from kvgate.cachestore.index import PrefixIndex
from kvgate.cachestore.policy import EvictionPolicy
from kvgate.cachestore.pool import PagePool
from kvgate.kernels.layout import KVLayout
from tests.cachestore.conftest import BLOCK

NS = "tenant:1"


@pytest.fixture
def device(layout: KVLayout) -> PagePool:
    return PagePool(layout, 8, "cpu", False)


@pytest.fixture
def host(layout: KVLayout) -> PagePool:
    return PagePool(layout, 4, "cpu", False)


@pytest.fixture
def index(device: PagePool, host: PagePool) -> PrefixIndex:
    return PrefixIndex(device, host, EvictionPolicy(device.num_pages, host.num_pages))


def chain(index: PrefixIndex, device: PagePool, tokens: list[int]) -> list[Block]:
    """Index ``tokens`` as one chain of device blocks, then release it (all idle)."""
    data = token_bytes(tokens)
    hashes = block_hashes(root_digest("demo", "", NS), tokens, BLOCK)
    blocks: list[Block] = []
    for i, h in enumerate(hashes):
        parent = blocks[-1] if blocks else None
        blocks.append(index.insert(h, parent, NS, index.tokens_of(data, i), device.take(),
                                   300.0, pinned=False))
    index.unref(blocks, now=0.0)
    return blocks


def test_verify_accepts_only_the_same_parent_namespace_and_tokens(
    index: PrefixIndex, device: PagePool
) -> None:
    a0, a1 = chain(index, device, list(range(2 * BLOCK)))
    (b0,) = chain(index, device, list(range(100, 100 + BLOCK)))
    assert index.verify(a1, a0, NS, a1.tokens)
    assert not index.verify(a1, b0, NS, a1.tokens)  # another prefix's child
    assert not index.verify(a1, None, NS, a1.tokens)  # a child is no root
    assert not index.verify(a1, a0, NS, b0.tokens)  # same place, other tokens (a collision)
    assert not index.verify(a1, a0, "tenant:2", a1.tokens)  # other namespace


def test_walk_yields_the_verified_chain_and_stops_at_the_first_mismatch(
    index: PrefixIndex, device: PagePool
) -> None:
    tokens = list(range(3 * BLOCK))
    blocks = chain(index, device, tokens)
    data = token_bytes(tokens)
    hashes = block_hashes(root_digest("demo", "", NS), tokens, BLOCK)
    assert list(index.walk(NS, hashes, data)) == blocks
    assert list(index.walk("tenant:2", hashes, data)) == []  # same hashes, other namespace
    other = token_bytes([*tokens[:BLOCK], *range(900, 900 + 2 * BLOCK)])
    assert list(index.walk(NS, hashes, other)) == blocks[:1]  # block 1's tokens differ
    swapped = [hashes[0], hashes[2], hashes[1]]
    assert list(index.walk(NS, swapped, data)) == blocks[:1]  # block 2 is not block 0's child


def test_drop_removes_descendants_and_frees_their_pages(
    index: PrefixIndex, device: PagePool
) -> None:
    root, mid, leaf = chain(index, device, list(range(3 * BLOCK)))
    (other,) = chain(index, device, list(range(500, 500 + BLOCK)))
    assert device.num_used == 4 and index.num_idle_device == 4
    dropped = index.drop(mid)
    assert set(dropped) == {mid, leaf}
    assert not mid.alive and not leaf.alive and root.children == set()
    assert mid.hash not in index and leaf.hash not in index and len(index) == 2
    assert index.get(root.hash) is root and index.get(other.hash) is other
    assert device._is_free[mid.page] and device._is_free[leaf.page] and device.num_used == 2
    assert index.num_blocks(NS) == 2 and index.num_idle_device == 2
    assert index.policy.num_evictable(DEVICE) == 2


def test_an_active_block_is_never_dropped(index: PrefixIndex, device: PagePool) -> None:
    root, leaf = chain(index, device, list(range(2 * BLOCK)))
    index.ref(root)
    index.ref(leaf)
    with pytest.raises(RuntimeError, match="active"):
        index.drop(root)


def test_references_move_blocks_in_and_out_of_the_candidates(
    index: PrefixIndex, device: PagePool
) -> None:
    root, leaf = chain(index, device, list(range(2 * BLOCK)))
    policy = index.policy
    assert policy.num_evictable(DEVICE) == 2 and index.num_idle_device == 2
    index.ref(root)
    index.ref(root)
    assert policy.num_evictable(DEVICE) == 1 and index.num_idle_device == 1
    assert index.unref([root]) == []  # still held once
    assert index.unref([root]) == [root]
    assert policy.victim(DEVICE) is leaf  # released together earlier: deepest goes first
    with pytest.raises(RuntimeError, match="released twice"):
        index.unref([root])


def test_move_relocates_a_block_and_keeps_the_idle_count(
    index: PrefixIndex, device: PagePool, host: PagePool
) -> None:
    (block,) = chain(index, device, list(range(BLOCK)))
    old = block.page
    index.policy.remove(block)
    index.move(block, HOST, host.take())
    assert block.tier == HOST and device._is_free[old] and index.num_idle_device == 0
    assert block.state == "offloaded"
    index.ref(block)
    index.move(block, DEVICE, device.take())  # a promotion: active, not idle
    assert block.state == "active" and index.num_idle_device == 0 and host.num_used == 0
    assert len(index.drop(chain(index, device, list(range(50, 50 + BLOCK)))[0])) == 1
    assert index.namespaces() == [NS] and index.num_blocks(NS) == 1
