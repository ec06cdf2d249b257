"""Guaranteed shares: a namespace within its share keeps its blocks whatever others do."""

from __future__ import annotations

import random

from kvgate.cachestore import CacheStore
from tests.cachestore.conftest import BLOCK, FakeClock, MakeStore, run_request
from tests.cachestore.test_store import tokens

A, V = "tenant:attacker", "tenant:victim"


def cached_blocks(store: CacheStore, namespace: str, prompt: list[int]) -> int:
    """How many leading blocks of ``prompt`` the namespace finds (then let go)."""
    seq = store.open("probe", namespace)
    n = store.match(seq, prompt).num_blocks
    store.release(seq)
    return n


def evicted_by_others(store: CacheStore, namespace: str) -> dict[str, int]:
    share = store.stats().namespaces[namespace].share
    assert share is not None
    return share.evicted_by_others


def test_a_namespace_within_its_share_never_loses_blocks_to_another(
        make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=4)
    secret = tokens(3 * BLOCK, start=7000)
    run_request(store, "v", V, secret)  # 3 pages; two active namespaces: 4 each per tier
    for i in range(20):  # the other namespace churns through far more than the pool
        run_request(store, f"a{i}", A, tokens(4 * BLOCK, start=100 * i))
    assert cached_blocks(store, V, secret) == 3
    assert evicted_by_others(store, V) == {"device": 0, "host": 0}
    assert store.device.held == {V: 3, A: 4}  # V's missing page stays free for it
    stats = store.stats()
    assert stats.shares is not None and stats.shares.fallbacks == 0
    # a request larger than A's whole share takes V's free page (counted), not V's blocks
    run_request(store, "big", A, tokens(5 * BLOCK, start=9000))
    assert cached_blocks(store, V, secret) == 3
    stats = store.stats()
    assert stats.shares is not None and stats.shares.fallbacks == 1


def test_without_shares_the_same_traffic_evicts_it(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=4, shares=False)
    secret = tokens(3 * BLOCK, start=7000)
    run_request(store, "v", V, secret)
    for i in range(20):
        run_request(store, f"a{i}", A, tokens(5 * BLOCK, start=100 * i))
    assert cached_blocks(store, V, secret) == 0
    assert evicted_by_others(store, V)["device"] == 3


def test_blocks_over_their_share_go_first_and_only_down_to_the_share(
        make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=0)
    big = tokens(6 * BLOCK, start=5000)
    run_request(store, "v", V, big)  # alone: its share is the whole pool
    old = tokens(1 * BLOCK, start=9000)
    run_request(store, "a0", A, old)  # now two: 4 pages each; A holds 1, 1 page free
    run_request(store, "a1", A, tokens(3 * BLOCK, start=9100))  # needs 2 more: V's excess
    assert cached_blocks(store, V, big) == 4  # its chain's two deepest blocks went
    assert evicted_by_others(store, V)["device"] == 2
    # A is at its share now: more of its traffic recycles its own pages, oldest first
    run_request(store, "a2", A, tokens(2 * BLOCK, start=9500))
    assert cached_blocks(store, V, big) == 4
    assert cached_blocks(store, A, old) == 0
    assert evicted_by_others(store, V)["device"] == 2


def test_when_every_candidate_is_protected_plain_order_decides_and_is_counted(
        make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=0)
    secret = tokens(4 * BLOCK, start=7000)
    run_request(store, "v", V, secret)  # V: exactly its share, all idle
    seq = store.open("a", A)
    store.match(seq, tokens(1))
    assert store.allocate(seq, 4 * BLOCK)  # A: its share, all active (not evictable)
    assert store.allocate(seq, 5 * BLOCK)  # one more: only V's protected blocks are idle
    stats = store.stats()
    assert stats.shares is not None and stats.shares.fallbacks == 1
    assert evicted_by_others(store, V)["device"] == 1
    store.release(seq)
    assert cached_blocks(store, V, secret) == 3  # the deepest block went


def test_an_active_namespace_keeps_the_free_pages_its_share_lacks(
        make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=0)
    run_request(store, "v", V, tokens(1 * BLOCK, start=7000))  # V: 1 of its 4 pages
    for i in range(6):
        run_request(store, f"a{i}", A, tokens(3 * BLOCK, start=100 * i))
    assert store.device.held == {V: 1, A: 4}  # 3 pages stay free for V
    mine = tokens(3 * BLOCK, start=8000)
    run_request(store, "v2", V, mine)  # V writes into them: A loses nothing
    assert store.device.held == {V: 4, A: 4}
    assert evicted_by_others(store, A)["device"] == 0
    assert cached_blocks(store, V, mine) == 3


def test_an_idle_namespace_loses_its_protection_after_the_window(
        make_store: MakeStore, clock: FakeClock) -> None:
    store = make_store(device_pages=8, host_pages=0, share_window_s=10.0)
    secret = tokens(3 * BLOCK, start=7000)
    run_request(store, "v", V, secret)
    clock.advance(11)  # V has not been seen for longer than the window: A alone is active
    for i in range(4):
        run_request(store, f"a{i}", A, tokens(4 * BLOCK, start=100 * i))
    assert cached_blocks(store, V, secret) == 0
    v = store.stats().namespaces[V].share
    assert v is not None and v.active  # the probe made it active again


def test_a_reservation_replaces_the_fair_share(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=4)
    store.set_reservation(V, 6 * store.layout.page_bytes, 6 * store.layout.page_bytes)
    secret = tokens(6 * BLOCK, start=7000)
    run_request(store, "v", V, secret)
    for i in range(10):
        run_request(store, f"a{i}", A, tokens(2 * BLOCK, start=100 * i))
    assert cached_blocks(store, V, secret) == 6
    s = store.stats().namespaces
    pb = store.layout.page_bytes
    v, a = s[V].share, s[A].share
    assert v is not None and a is not None
    assert v.share_bytes == {"device": 6 * pb, "host": 4 * pb}  # capped at the host tier
    assert a.share_bytes == {"device": 2 * pb, "host": 0}
    store.set_reservation(V, None, None)
    v = store.stats().namespaces[V].share
    assert v is not None and v.share_bytes == {"device": 4 * pb, "host": 2 * pb}


def test_by_default_only_a_reservation_protects_and_it_outlives_activity(
        make_store: MakeStore, clock: FakeClock) -> None:
    """The default store (no fair shares): an unreserved tenant's blocks go in plain order;
    a reserved one keeps what it holds within its reservation even while idle (it pays for
    it), but keeps no free pages from others while idle."""
    store = make_store(device_pages=8, host_pages=0, shares=False, share_window_s=10.0)
    pb = store.layout.page_bytes
    secret = tokens(3 * BLOCK, start=7000)
    plain = tokens(3 * BLOCK, start=9000)
    store.set_reservation(V, 3 * pb, None)  # device only
    run_request(store, "v", V, secret)
    run_request(store, "u", "tenant:unreserved", plain)
    clock.advance(11)  # V is idle now: its reservation still protects what it holds
    for i in range(6):
        run_request(store, f"a{i}", A, tokens(4 * BLOCK, start=100 * i))
    assert cached_blocks(store, V, secret) == 3
    assert cached_blocks(store, "tenant:unreserved", plain) == 0
    # idle, V keeps no free pages: A's working set takes every page V does not hold
    assert store.stats().shares.fallbacks == 0
    assert store.reservations() == {V: {"device": 3 * pb}}
    run_request(store, "a-big", A, tokens(5 * BLOCK, start=50_000))
    assert cached_blocks(store, A, tokens(5 * BLOCK, start=50_000)) == 5


def test_stats_report_share_usage_and_evictions_by_tier(make_store: MakeStore) -> None:
    store = make_store(device_pages=8, host_pages=4)
    run_request(store, "v", V, tokens(2 * BLOCK + 1, start=7000))
    run_request(store, "a", A, tokens(3 * BLOCK, start=100))
    stats = store.stats()
    pb = store.layout.page_bytes
    d = stats.as_dict()
    assert d["shares"] == {"enabled": True, "window_s": 300.0, "active_namespaces": 2,
                           "fallbacks": 0}
    namespaces = d["namespaces"]
    assert isinstance(namespaces, dict)
    assert namespaces[V]["share_bytes"] == {"device": 4 * pb, "host": 2 * pb}
    assert namespaces[V]["used_bytes"] == {"device": 2 * pb, "host": 0}
    assert namespaces[A]["used_bytes"] == {"device": 3 * pb, "host": 0}
    assert namespaces[V]["evicted_by_others"] == {"device": 0, "host": 0}
    assert namespaces[V]["active"] is True
    off = CacheStore(store.layout, 8 * pb, 4 * pb, shares=False)
    run_request(off, "v", V, tokens(BLOCK))
    s = off.stats()
    assert s.shares is not None and s.shares.enabled is False
    v = s.namespaces[V].share
    assert v is not None and v.share_bytes == {"device": 0, "host": 0}


def test_one_namespace_behaves_exactly_as_without_shares(make_store: MakeStore) -> None:
    """Same trace, shares on and off: the same hits, evictions and tier moves."""
    results = []
    for shares in (True, False):
        store = make_store(device_pages=6, host_pages=4, shares=shares)
        rng = random.Random(7)
        hits = []
        for i in range(200):
            prompt = tokens(rng.randint(1, 5) * BLOCK + rng.randint(0, 3),
                            start=1000 * rng.randint(0, 12))
            hits.append(run_request(store, f"r{i}", V, prompt)[0].num_cached_tokens)
        s = store.stats()
        results.append((hits, s.evictions, s.promotions, s.demotions))
    assert results[0] == results[1]
    assert sum(results[0][0]) > 0 and results[0][3].count > 0  # the trace exercises both
