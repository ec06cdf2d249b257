"""Eviction order: which idle blocks the segmented LRU with ghosts keeps under pressure."""

from __future__ import annotations

from kvgate.cachestore import CacheStore
from kvgate.cachestore.block import DEVICE
from tests.cachestore.conftest import BLOCK, FakeClock, MakeStore, expire, run_request
from tests.cachestore.test_store import NS, tokens

SYSTEM = tokens(2 * BLOCK)


def _evict_system_then_ask_again(store: CacheStore, churn_requests: int) -> None:
    run_request(store, "s1", NS, SYSTEM)  # seen once: probation
    run_request(store, "x", NS, tokens(8 * BLOCK, start=100))  # drops it: a ghost now
    for i in range(churn_requests):  # every drop pushes older ghosts out
        run_request(store, f"churn{i}", NS, tokens(8 * BLOCK, start=1000 + 100 * i))
    assert run_request(store, "s2", NS, SYSTEM)[0].num_blocks == 0  # a miss: written again
    run_request(store, "b", NS, tokens(3 * BLOCK, start=500))  # newer, seen once
    seq = store.open("c", NS)
    assert store.allocate(seq, 6 * BLOCK)  # evicts six idle blocks of eight
    store.release(seq)


def test_a_block_asked_for_again_after_its_eviction_counts_as_reused(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=0)
    _evict_system_then_ask_again(store, churn_requests=0)
    # Plain recency would have evicted the system prompt (older than b); its ghost marks it
    # reused, so both its blocks are in the protected segment and survive.
    assert run_request(store, "s3", NS, SYSTEM)[0].num_blocks == 2
    assert run_request(store, "b2", NS, tokens(3 * BLOCK, start=500))[0].num_blocks == 0


def test_ghosts_are_forgotten_after_as_many_drops_as_the_tiers_hold(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=0)  # ghosts: the last 16 dropped hashes
    _evict_system_then_ask_again(store, churn_requests=2)
    assert run_request(store, "s3", NS, SYSTEM)[0].num_blocks == 0


def test_a_ghost_child_never_outranks_its_prefix(make_store: MakeStore, clock: FakeClock) -> None:
    """A child counts as reused only if its parent does, so the prefix still goes last."""
    store = make_store(device_pages=8, host_pages=0)  # ghosts: the last 16 dropped hashes
    chain = tokens(3 * BLOCK, start=200)
    run_request(store, "a", NS, chain)
    clock.advance(301)
    assert expire(store, NS) == 3  # ghosts, root first: the root is the oldest
    for i in range(2):  # fourteen more ghosts push the chain's root out, not its children
        run_request(store, f"y{i}", NS, tokens(7 * BLOCK, start=600 + 100 * i))
        clock.advance(301)
        assert expire(store, NS) == 7
    run_request(store, "a2", NS, chain)
    blocks = sorted((b for b in store.index.values() if b.namespace == NS), key=lambda b: b.depth)
    assert [b.depth for b in blocks] == [0, 1, 2]
    assert [b.hits for b in blocks] == [0, 0, 0]  # the children's ghosts do not count alone
    order = []
    while (victim := store.policy.victim(DEVICE)) is not None:
        store.policy.remove(victim)
        order.append(victim)
    assert order == blocks[::-1]  # deepest first
