"""Tiny stores: pages of a few bytes, so tests exercise the policy, not memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvgate.cachestore import CacheStore, PrefixMatch
from kvgate.kernels.layout import KVLayout

BLOCK = 4

MakeStore = Callable[..., CacheStore]  # make_store(device_pages, host_pages, **CacheStore kwargs)


class FakeClock:
    """The store's clock, moved by hand so TTL tests need no sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, block_size=BLOCK, dtype=torch.float32)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_store(layout: KVLayout, clock: FakeClock) -> MakeStore:
    def make(device_pages: int = 8, host_pages: int = 8, **kw: Any) -> CacheStore:
        """Fair shares on unless a test says otherwise: most tests here exercise the
        protection that fair shares and reservations share; the store's own default (off:
        only reservations protect) is checked in test_store and test_side_channel."""
        kw.setdefault("shares", True)
        pb = layout.page_bytes
        return CacheStore(layout, device_pages * pb, host_pages * pb, clock=clock, **kw)

    return make


def expire(store: CacheStore, namespace: str) -> int:
    """Let the store drop what has expired, as a request's ``match`` does (expiry is lazy);
    → blocks dropped for their TTL."""
    before = store.counters.evictions.ttl
    seq = store.open("expire", namespace)
    store.match(seq, [])
    store.release(seq)
    return store.counters.evictions.ttl - before


def run_request(
    store: CacheStore, seq_id: str, namespace: str, tokens: list[int], **kw: Any
) -> tuple[PrefixMatch, dict[float, int]]:
    """What the engine does for one prompt: match, allocate, (compute), commit, release,
    and count the prompt once as it is billed."""
    seq = store.open(seq_id, namespace, **kw)
    m = store.match(seq, tokens)
    assert store.allocate(seq, len(tokens))
    written = store.commit(seq, tokens)
    store.release(seq)
    store.record_prompt(namespace, len(tokens), m.num_cached_tokens)
    return m, written
