"""The cache's events describe it exactly: a view built from them (and from a snapshot
taken at any point) always equals the index, through writes, evictions, demotions,
promotions, TTL expiry and flushes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate.cachestore import CacheStore
from kvgate.cachestore.events import CacheEvent
from kvgate.gateway.protocol.wire import EventBatch
from kvgate.gateway.route.index import ClusterIndex
from kvgate.kernels.layout import KVLayout
from tests.cachestore.conftest import expire

BLOCK = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, block_size=BLOCK,
                  dtype=torch.float32)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(store: CacheStore, seq_id: str, ns: str, tokens: list[int]) -> None:
    seq = store.open(seq_id, ns)
    store.match(seq, tokens)
    if store.allocate(seq, len(tokens)):
        store.commit(seq, tokens)
    store.release(seq)


def _truth(store: CacheStore) -> dict[bytes, str]:
    return {h: b.tier for h, b in store.index.items()}


ops = st.lists(st.one_of(
    st.tuples(st.just("req"), st.integers(0, 2), st.integers(0, 3), st.integers(1, 6)),
    st.tuples(st.just("wait"), st.integers(0, 400)),
    st.tuples(st.just("flush"), st.integers(0, 2)),
    st.tuples(st.just("snapshot")),
), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_a_view_from_events_and_snapshots_is_the_index(steps: list[tuple]) -> None:
    clock = Clock()
    pb = LAYOUT.page_bytes
    store = CacheStore(LAYOUT, 6 * pb, 3 * pb, clock=clock, default_ttl_s=300.0,
                       shares=False)
    events: list[CacheEvent] = []
    store.index.on_event = events.append
    view = ClusterIndex()
    view.load("r", "e", 0, [])
    late = ClusterIndex()  # a router that joins later, from a snapshot
    joined = False
    n = 0
    for step in steps:
        if step[0] == "req":
            _, ns, prefix, blocks = step
            tokens = [prefix * 7 + 1] * BLOCK + list(range(blocks * BLOCK))
            n += 1
            _run(store, f"s{n}", f"tenant:{ns}", tokens)
        elif step[0] == "wait":
            clock.now += step[1]
            expire(store, "tenant:0")  # what the next request's match drops first
        elif step[0] == "flush":
            store.flush(f"tenant:{step[1]}")
        else:
            seq, blocks_now = store.snapshot()
            late.load("r", "e", seq, [(b.block_hash, b.tier) for b in blocks_now])
            joined = True
        if events:
            batch = EventBatch("r", "e", events[0].seq, events[-1].seq, list(events))
            assert view.apply(batch)
            if joined:
                late.apply(batch)
            events.clear()
        truth = _truth(store)
        assert view.views["r"].blocks == truth
        if joined:
            assert late.views["r"].blocks == truth
