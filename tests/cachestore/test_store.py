"""The store's behaviour, one rule per test: hits, collisions, eviction order, tiers, TTL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvgate.cachestore import CacheSeq, CacheStore, PageMoves
from kvgate.kernels.layout import KVLayout
from tests.cachestore.conftest import BLOCK, FakeClock, MakeStore, expire, run_request

NS = "tenant:1"


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def fill(store: CacheStore, seq: CacheSeq, value_of: Callable[[int], float]) -> None:
    """Stand-in for the model writing KV: every page gets recognisable values."""
    for page in seq.block_table:
        store.device_pool[page].fill_(value_of(page))


def test_second_request_hits_the_full_blocks_of_the_first(make_store: MakeStore) -> None:
    store = make_store()
    prompt = tokens(3 * BLOCK + 2)
    m1, w1 = run_request(store, "a", NS, prompt)
    assert m1.num_cached_tokens == 0 and w1 == {300.0: 3 * BLOCK}
    m2, w2 = run_request(store, "b", NS, [*prompt, 99])
    assert (m2.num_cached_tokens, m2.num_blocks, m2.device_hits, m2.host_hits) == (3 * BLOCK, 3, 3, 0)
    assert w2 == {}
    s = store.stats()
    assert s.hit_tokens == 3 * BLOCK and s.miss_tokens == len(prompt) + len(prompt) + 1 - 3 * BLOCK


def test_forced_hash_collision_is_a_miss_never_a_wrong_block(make_store: MakeStore) -> None:
    store = make_store(hash_fn=lambda data: b"\x00" * 16)  # every block collides
    run_request(store, "a", NS, tokens(2 * BLOCK))
    m, w = run_request(store, "b", NS, tokens(2 * BLOCK, start=500))
    assert m.num_blocks == 0 and w == {}  # not indexed over the other block
    m, _ = run_request(store, "c", "tenant:2", tokens(2 * BLOCK))
    assert m.num_blocks == 0  # same tokens, same (forced) hash, other namespace
    m, _ = run_request(store, "d", NS, tokens(2 * BLOCK))
    assert m.num_blocks == 1  # block 1 collides with block 0 and was never indexed


def test_namespaces_never_share_blocks(make_store: MakeStore) -> None:
    store = make_store()
    run_request(store, "a", "tenant:1", tokens(2 * BLOCK))
    m, w = run_request(store, "b", "tenant:2", tokens(2 * BLOCK))
    assert m.num_blocks == 0 and w == {300.0: 2 * BLOCK}
    assert store.flush("tenant:1") == 2
    assert run_request(store, "c", "tenant:2", tokens(2 * BLOCK))[0].num_blocks == 2


def test_device_eviction_takes_the_deepest_block_first(make_store: MakeStore) -> None:
    store = make_store(device_pages=4, host_pages=0)
    run_request(store, "a", NS, tokens(3 * BLOCK))  # blocks 0, 1, 2 cached
    seq = store.open("b", NS)
    store.match(seq, tokens(2, start=900))
    assert store.allocate(seq, 2 * BLOCK)  # 1 free page + 1 eviction
    store.release(seq)
    m, _ = run_request(store, "c", NS, tokens(3 * BLOCK))
    assert m.num_blocks == 2  # the prefix survived, the extension went
    assert store.stats().evictions.lru == 1


def test_allocate_fails_when_only_active_pages_are_left(make_store: MakeStore) -> None:
    store = make_store(device_pages=3, host_pages=4)
    a = store.open("a", NS)
    store.match(a, tokens(2 * BLOCK))
    assert store.allocate(a, 2 * BLOCK)
    b = store.open("b", NS)
    assert not store.allocate(b, 2 * BLOCK)
    assert b.block_table == [] and store.stats().device.blocks["free"] == 1
    store.commit(a, tokens(2 * BLOCK))
    store.release(a)  # now cached: evictable
    assert store.allocate(b, 3 * BLOCK)
    assert store.stats().demotions.count == 2


def test_demote_then_promote_keeps_page_bytes(make_store: MakeStore) -> None:
    store = make_store(device_pages=3, host_pages=4)
    prompt = tokens(2 * BLOCK)
    a = store.open("a", NS)
    store.match(a, prompt)
    store.allocate(a, len(prompt))
    fill(store, a, lambda page: 10.0 + page)
    original = [store.device_pool[p].clone() for p in a.block_table]
    store.commit(a, prompt)
    store.release(a)
    b = store.open("b", NS)  # pushes both blocks to the host
    store.match(b, tokens(3 * BLOCK, start=100))
    assert store.allocate(b, 3 * BLOCK)
    fill(store, b, lambda page: -1.0)
    s = store.stats()
    assert s.host.blocks["offloaded"] == 2 and s.demotions == PageMoves(2, 2 * store.layout.page_bytes)
    store.release(b)
    c = store.open("c", NS)
    m = store.match(c, [*prompt, 7])
    assert (m.num_blocks, m.device_hits, m.host_hits) == (2, 0, 2)
    for page, want in zip(c.block_table, original, strict=True):
        assert torch.equal(store.device_pool[page], want)
    assert store.stats().promotions.count == 2


def test_a_host_hit_with_no_device_room_is_a_miss_not_a_crash(make_store: MakeStore) -> None:
    """Every device page held by running sequences: a prefix cached on the host cannot be
    promoted, so the match stops before it (it was an IndexError in the engine step)."""
    store = make_store(device_pages=2, host_pages=4)
    run_request(store, "a", NS, tokens(2 * BLOCK))
    holder = store.open("h", NS)
    store.match(holder, tokens(1, start=900))
    assert store.allocate(holder, 2 * BLOCK)  # both device pages, the blocks go to the host
    assert store.stats().host.blocks["offloaded"] == 2
    c = store.open("c", NS)
    m = store.match(c, [*tokens(2 * BLOCK), 7])
    assert (m.num_blocks, m.host_hits) == (0, 0) and c.block_table == []
    store.release(c)
    store.release(holder)
    d = store.open("d", NS)
    m = store.match(d, [*tokens(2 * BLOCK), 7])
    assert (m.num_blocks, m.host_hits) == (2, 2)  # still cached, promoted once there is room
    store.release(d)


def test_host_tier_full_drops_its_own_lru(make_store: MakeStore) -> None:
    store = make_store(device_pages=2, host_pages=1)
    run_request(store, "a", NS, tokens(2 * BLOCK))
    run_request(store, "b", NS, tokens(2 * BLOCK, start=100))
    s = store.stats()  # room on the host for one of the two: the prefix keeps it
    assert s.host.blocks["offloaded"] == 1 and s.evictions.lru == 1 and s.demotions.count == 1
    m, _ = run_request(store, "c", NS, tokens(2 * BLOCK))
    assert (m.num_blocks, m.host_hits) == (1, 1)


def test_ttl_expiry_on_device_and_on_host_at_the_next_request(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store(device_pages=4, host_pages=4)
    run_request(store, "a", NS, tokens(2 * BLOCK))  # default 300 s
    run_request(store, "b", NS, tokens(BLOCK, start=50), default_ttl_s=3600)
    seq = store.open("c", NS)  # demote the default-TTL blocks to the host
    assert store.allocate(seq, 3 * BLOCK)
    store.release(seq)
    assert store.stats().host.blocks["offloaded"] >= 1
    clock.advance(301)
    assert expire(store, NS) == 2
    assert store.stats().host.blocks["offloaded"] == 0
    assert run_request(store, "d", NS, tokens(BLOCK, start=50))[0].num_blocks == 1
    clock.advance(3599)
    assert run_request(store, "e", NS, tokens(BLOCK, start=50))[0].num_blocks == 1  # refreshed
    clock.advance(3601)
    m, w = run_request(store, "f", NS, tokens(BLOCK, start=50))  # lazy: found expired on access
    assert m.num_blocks == 0 and w == {300.0: BLOCK}  # rewritten with the default TTL
    assert store.stats().evictions.ttl == 3


def test_ttl_segments_choose_each_blocks_ttl(make_store: MakeStore) -> None:
    store = make_store()
    _, w = run_request(store, "a", NS, tokens(3 * BLOCK), ttl_segments=[(2 * BLOCK, 3600.0)])
    assert w == {3600.0: 2 * BLOCK, 300.0: BLOCK}


def test_concurrent_commit_shares_and_does_not_write(make_store: MakeStore) -> None:
    store = make_store(device_pages=8)
    prompt = tokens(2 * BLOCK)
    a, b = store.open("a", NS), store.open("b", NS)
    for seq in (a, b):
        store.match(seq, prompt)
        store.allocate(seq, len(prompt))
    assert store.commit(a, prompt) == {300.0: 2 * BLOCK}
    assert store.commit(b, prompt) == {}
    assert len(store.index) == 2 and store.stats().device.blocks["active"] == 4
    store.release(b)  # b's private pages go back, the shared blocks stay held by a
    s = store.stats().device.blocks
    assert s == {"free": 6, "active": 2, "cached": 0}
    store.release(a)
    assert store.stats().device.blocks == {"free": 6, "active": 0, "cached": 2}


def test_quota_makes_a_namespace_evict_its_own_blocks(
    make_store: MakeStore, layout: KVLayout
) -> None:
    store = make_store(device_pages=16, host_pages=0)
    store.set_quota(NS, 3 * layout.page_bytes)
    run_request(store, "other", "tenant:2", tokens(2 * BLOCK))
    run_request(store, "a", NS, tokens(2 * BLOCK))
    _, w = run_request(store, "b", NS, tokens(2 * BLOCK, start=100))
    assert w == {300.0: 2 * BLOCK}
    s = store.stats()
    assert s.namespaces[NS].cached_bytes == 3 * layout.page_bytes
    assert s.namespaces["tenant:2"].cached_bytes == 2 * layout.page_bytes
    assert s.evictions.quota == 1
    assert run_request(store, "c", NS, tokens(2 * BLOCK, start=100))[0].num_blocks == 2
    store.set_quota(NS, layout.page_bytes)
    assert store.stats().namespaces[NS].cached_bytes == layout.page_bytes


def test_quota_full_of_active_blocks_leaves_new_blocks_unindexed(
    make_store: MakeStore, layout: KVLayout
) -> None:
    store = make_store()
    store.set_quota(NS, layout.page_bytes)
    _, w = run_request(store, "a", NS, tokens(3 * BLOCK))
    assert w == {300.0: BLOCK} and store.stats().namespaces[NS].cached_bytes == layout.page_bytes
    assert store.stats().device.blocks["free"] == 7


def test_pinned_prefix_is_never_evicted_nor_expired(
    make_store: MakeStore, clock: FakeClock
) -> None:
    store = make_store(device_pages=4, host_pages=0)
    system = tokens(2 * BLOCK)
    run_request(store, "a", NS, system)
    assert store.pin(NS, system) == 2
    clock.advance(10_000)
    assert expire(store, NS) == 0
    seq = store.open("b", NS)
    assert not store.allocate(seq, 3 * BLOCK)  # only 2 pages not pinned
    assert store.allocate(seq, 2 * BLOCK)
    store.release(seq)
    assert run_request(store, "c", NS, system)[0].num_blocks == 2
    store.unpin(NS)
    clock.advance(301)
    assert expire(store, NS) == 2


def test_keyed_pins_come_off_one_at_a_time(make_store: MakeStore, clock: FakeClock) -> None:
    """Two explicit caches share a first block: deleting one keeps the shared block and
    the other's pinned; a pin registered before its blocks exist pins them as written."""
    store = make_store(device_pages=8, host_pages=0)
    a = tokens(2 * BLOCK)
    b = [*tokens(BLOCK), *tokens(BLOCK, start=500)]
    assert store.pin(NS, a, "cache_a") == 0  # nothing cached yet
    run_request(store, "x", NS, a)
    assert store.pinned_blocks(NS) == 2  # pinned as they were written
    run_request(store, "y", NS, b)
    assert store.pin(NS, b, "cache_b") == 2
    assert store.pinned_blocks(NS) == 3
    store.unpin(NS, "cache_a")
    assert store.pinned_blocks(NS) == 2  # the first block is cache_b's too
    store.unpin(NS, "cache_a")  # twice: nothing more
    store.unpin("tenant:2", "cache_b")  # another namespace's key: nothing
    assert store.pinned_blocks(NS) == 2
    clock.advance(301)
    assert expire(store, NS) == 1  # a's second block, unpinned, expires
    store.unpin(NS, "cache_b")
    assert store.pinned_blocks(NS) == 0
    assert expire(store, NS) == 2


def test_flush_drops_idle_blocks_and_keeps_active_ones(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=2)
    run_request(store, "a", NS, tokens(2 * BLOCK))
    held = store.open("b", NS)
    store.match(held, tokens(BLOCK, start=40))
    store.allocate(held, BLOCK)
    store.commit(held, tokens(BLOCK, start=40))
    assert store.flush(NS) == 2
    assert len(store.index) == 1
    store.release(held)
    assert run_request(store, "c", NS, tokens(BLOCK, start=40))[0].num_blocks == 1
    assert run_request(store, "d", NS, tokens(2 * BLOCK))[0].num_blocks == 0


def test_release_twice_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    seq = store.open("a", NS)
    store.match(seq, tokens(BLOCK))
    store.allocate(seq, BLOCK)
    store.commit(seq, tokens(BLOCK))
    blocks = list(seq.blocks)
    store.release(seq)
    seq.blocks, seq.block_table = blocks, [blocks[0].page]
    with pytest.raises(RuntimeError):
        store.release(seq)


def test_stats_json_shape(make_store: MakeStore) -> None:
    store = make_store()
    run_request(store, "a", NS, tokens(2 * BLOCK + 1))
    d: dict[str, Any] = store.stats().as_dict()  # JSON: read like a client would
    assert set(d) >= {"device", "host", "hit_tokens", "miss_tokens", "evictions", "promotions",
                      "demotions", "namespaces"}
    assert set(d["device"]) == {"capacity_bytes", "used_bytes", "capacity_pages", "used_pages",
                                "page_bytes", "kv_dtype", "blocks"}
    assert set(d["evictions"]) == {"lru", "ttl", "quota"}
    assert set(d["promotions"]) == set(d["demotions"]) == {"count", "bytes"}
    pb = store.layout.page_bytes
    assert d["namespaces"][NS] == {
        "cached_bytes": 2 * pb, "hit_tokens": 0, "miss_tokens": 2 * BLOCK + 1, "hit_rate": 0.0,
        "active": True, "share_bytes": {"device": 8 * pb, "host": 8 * pb},
        "used_bytes": {"device": 2 * pb, "host": 0},
        "evicted_by_others": {"device": 0, "host": 0},
        "reserved_bytes": {"device": 0, "host": 0}}  # fair shares here, no reservation
    assert d["shares"] == {"enabled": True, "window_s": 300.0, "active_namespaces": 1,
                           "fallbacks": 0}


def test_stats_snapshot_is_consistent_while_the_owner_mutates(make_store: MakeStore) -> None:
    store = make_store(device_pages=6, host_pages=3)
    stop = threading.Event()
    bad: list[dict] = []

    def reader() -> None:
        while not stop.is_set():
            s = store.stats()
            if sum(s.device.blocks.values()) != s.device.capacity_pages or s.hit_tokens < 0:
                bad.append(s.as_dict())

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            run_request(store, f"r{i}", NS, tokens(2 * BLOCK + 1, start=(i % 7) * 100))
    finally:
        stop.set()
        t.join()
    assert not bad


def test_reused_blocks_outlive_a_one_off_scan(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=0)  # protected segment: 4 pages
    system = tokens(2 * BLOCK)
    run_request(store, "a1", NS, system)
    run_request(store, "a2", NS, system)  # reused: protected
    run_request(store, "b", NS, tokens(3 * BLOCK, start=500))  # seen once: probation
    seq = store.open("c", NS)
    assert store.allocate(seq, 6 * BLOCK)  # 3 free + 3 evicted: all of b, none of the system
    store.release(seq)
    assert run_request(store, "d", NS, system)[0].num_blocks == 2
    assert run_request(store, "e", NS, tokens(3 * BLOCK, start=500))[0].num_blocks == 0


def test_match_counts_nothing_record_prompt_counts_what_is_billed(make_store: MakeStore) -> None:
    """The engine matches ``prompt[:-1]``, again after a preemption, and bills once."""
    store = make_store()
    probe = store.open("probe", NS)
    store.match(probe, tokens(3 * BLOCK))
    store.release(probe)
    s = store.stats()
    assert (s.hit_tokens, s.miss_tokens) == (0, 0)
    assert all((n.hit_tokens, n.miss_tokens) == (0, 0) for n in s.namespaces.values())
    prompts = [tokens(2 * BLOCK + 3), tokens(3 * BLOCK), tokens(2 * BLOCK + 3),
               tokens(BLOCK, start=70)]
    for i, prompt in enumerate(prompts):
        seq = store.open(f"r{i}", NS)
        store.match(seq, prompt[:-1])
        store.release(seq)  # preempted before it ran
        seq = store.open(f"r{i}#2", NS)
        m = store.match(seq, prompt[:-1])
        assert store.allocate(seq, len(prompt))
        store.commit(seq, prompt)
        store.release(seq)
        store.record_prompt(NS, len(prompt), m.num_cached_tokens)
    s = store.stats()
    assert s.hit_tokens + s.miss_tokens == sum(len(p) for p in prompts)
    assert s.hit_tokens == 2 * BLOCK + 2 * BLOCK  # the 2nd and 3rd prompts reuse 2 blocks
    ns = s.namespaces[NS]
    assert (ns.hit_tokens, ns.miss_tokens) == (s.hit_tokens, s.miss_tokens)


def test_record_prompt_keeps_namespaces_apart_and_refuses_impossible_counts(
    make_store: MakeStore
) -> None:
    store = make_store()
    store.record_prompt("tenant:1", 10, 4)
    store.record_prompt("tenant:2", 7, 0)
    store.record_prompt("tenant:1", 5, 5)
    s = store.stats()
    assert (s.hit_tokens, s.miss_tokens) == (9, 13)
    assert {k: v for k, v in s.namespaces["tenant:1"].as_dict().items()
            if k in {"cached_bytes", "hit_tokens", "miss_tokens", "hit_rate"}} == {
        "cached_bytes": 0, "hit_tokens": 9, "miss_tokens": 6, "hit_rate": 0.6}
    assert s.namespaces["tenant:2"].hit_rate == 0.0
    with pytest.raises(ValueError, match="cached_tokens"):
        store.record_prompt(NS, 3, 4)
    assert store.stats().hit_tokens == 9


def test_stats_snapshot_does_not_change_afterwards(make_store: MakeStore) -> None:
    store = make_store(device_pages=2, host_pages=1)
    run_request(store, "a", NS, tokens(2 * BLOCK))
    before = store.stats()
    run_request(store, "b", NS, tokens(2 * BLOCK, start=100))
    assert before.demotions.count == before.evictions.lru == 0
    assert before.namespaces[NS].miss_tokens == 2 * BLOCK
    assert store.stats().demotions.count == 1


def test_blocks_being_computed_are_found_until_committed_or_released(
        make_store: MakeStore) -> None:
    """One prefill per prefix: what ``announce`` records is found by ``in_flight`` for the
    same namespace only, moves on as blocks are committed, and is gone on release."""
    store = make_store()
    prompt = tokens(4 * BLOCK + 3)
    hashes = store.block_hashes(NS, prompt)
    assert len(hashes) == 4
    assert store.in_flight(NS, hashes, 4) is None  # nobody computes anything
    lead = store.open("lead", NS)
    store.match(lead, prompt[:-1])
    assert store.allocate(lead, len(prompt))
    assert store.announce(lead, hashes) == 4
    assert store.in_flight(NS, hashes, 4) == (0, "lead")
    assert store.in_flight(NS, hashes, 0) is None  # a prompt with no full block to match
    # the same tokens in another namespace chain from another root: never found
    other = store.block_hashes("tenant:2", prompt)
    assert not set(other) & set(hashes)
    assert store.in_flight("tenant:2", other, 4) is None
    assert store.in_flight("tenant:2", hashes, 4) is None  # nor under a borrowed hash
    store.commit(lead, prompt[: 2 * BLOCK])
    assert store.in_flight(NS, hashes, 4) == (2, "lead")
    assert store.in_flight(NS, hashes, 4, start=2) == (2, "lead")
    assert store.in_flight(NS, hashes, 2) is None  # its two blocks are cached now
    # a second sequence announcing the same blocks leaves them the first one's
    late = store.open("late", NS)
    store.match(late, prompt[:-1])
    assert store.allocate(late, len(prompt))
    assert store.announce(late, hashes) == 0
    store.release(late)
    assert store.in_flight(NS, hashes, 4) == (2, "lead")
    store.release(lead)  # preempted, cancelled or finished: nobody waits any more
    assert store.in_flight(NS, hashes, 4) is None
    assert not store._computing and not lead.computing


def test_single_flight_counters_reach_the_stats(make_store: MakeStore) -> None:
    store = make_store()
    assert store.stats().as_dict()["single_flight"] == {"waited": 0, "timed_out": 0,
                                                        "saved_tokens": 0}
    store.record_wait(waited=True)
    store.record_wait(waited=True)
    store.record_wait(timed_out=True)
    store.record_wait(saved_tokens=3 * BLOCK)
    assert store.stats().as_dict()["single_flight"] == {"waited": 2, "timed_out": 1,
                                                        "saved_tokens": 3 * BLOCK}
