"""The remote tier under the store, against a real redis-server: write-through, fetch on
a miss, verification (collisions, tampering, other tenants), TTL, an outage, the queue."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from kvgate.cachestore import CacheStore
from kvgate.cachestore.remote_tier import (
    CostModel,
    ModelShape,
    RemoteRecord,
    RemoteTier,
    RemoteTierConfig,
)
from kvgate.kernels.layout import KVLayout
from tests.remote_tier.conftest import RedisServer

BLOCK = 4
PROMPT = list(range(100, 113))  # 3 full blocks and one token


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, block_size=BLOCK,
                    dtype=torch.float32)


Replica = Callable[..., CacheStore]


@pytest.fixture
def replica(layout: KVLayout, valkey: RedisServer) -> Iterator[Replica]:
    """A store attached to the test's Valkey (cost model off: every fetch is worth it)."""
    tiers: list[RemoteTier] = []

    def make(device_pages: int = 16, host_pages: int = 0, ttl_s: float = 300.0,
             hash_fn: Any = None, **config: Any) -> CacheStore:
        pb = layout.page_bytes
        kw = {} if hash_fn is None else {"hash_fn": hash_fn}
        store = CacheStore(layout, device_pages * pb, host_pages * pb, default_ttl_s=ttl_s, **kw)
        tier = RemoteTier(RemoteTierConfig(url=valkey.url, **{"timeout_ms": 200, **config}),
                          layout, "demo")
        tiers.append(tier)
        store.attach_tier(tier, None)
        return store

    yield make
    for tier in tiers:
        tier.close()


def kv_of(namespace: str, position: int, tokens: list[int], layout: KVLayout) -> torch.Tensor:
    """What 'computing' block ``position`` writes: a page determined by its whole prefix."""
    seed = hash((namespace, tuple(tokens[: (position + 1) * BLOCK]))) % (2**31)
    return torch.randn(layout.page_shape, generator=torch.Generator().manual_seed(seed))


def serve(store: CacheStore, namespace: str, tokens: list[int]) -> int:
    """One request as the engine runs it: fetch (off the engine thread), adopt, match,
    compute what missed, commit, release. → blocks found in the cache."""
    fetched = store.fetch_remote(namespace, tokens)
    seq = store.open(f"s{time.monotonic_ns()}", namespace)
    if fetched is not None:
        store.adopt_remote(seq, tokens, fetched)
    match = store.match(seq, tokens)
    assert store.allocate(seq, len(tokens))
    for i in range(match.num_blocks, len(tokens) // BLOCK):
        store.device.tensor[seq.block_table[i]] = kv_of(namespace, i, tokens, store.layout)
    for i in range(match.num_blocks):  # what the cache gave is what was computed
        assert torch.equal(store.device.tensor[seq.block_table[i]],
                           kv_of(namespace, i, tokens, store.layout))
    store.commit(seq, tokens)
    store.release(seq)
    return match.num_blocks


def drained(store: CacheStore) -> RemoteTier:
    assert store.remote is not None
    assert store.remote.tiers[0].drain()
    return store.remote.tiers[0]


def keys(valkey: RedisServer) -> list[bytes]:
    """The entries' keys (not the namespaces' epoch keys)."""
    return sorted(k for k in valkey.client().keys("kvgate:kv:*")
                  if not k.startswith(b"kvgate:kv:epoch:"))


def epoch_keys(valkey: RedisServer) -> list[bytes]:
    return sorted(valkey.client().keys("kvgate:kv:epoch:*"))


def test_commit_writes_blocks_through_with_token_ids_and_ttl(replica: Replica,
                                                             valkey: RedisServer) -> None:
    store = replica(ttl_s=120)
    assert serve(store, "ns-a", PROMPT) == 0
    tier = drained(store)
    assert len(keys(valkey)) == 3
    client = valkey.client()
    for key in keys(valkey):
        assert 0 < client.pttl(key) <= 120_000
        value = client.get(key)
        assert value is not None and b"ns-a" in value
    stats = tier.stats()
    assert (stats.writes, stats.write_bytes) == (3, 3 * store.layout.page_bytes)


def test_an_empty_replica_fetches_the_prefix_and_bills_it_as_a_hit(replica: Replica) -> None:
    first, second = replica(), replica()
    serve(first, "ns-a", PROMPT)
    drained(first)
    assert serve(second, "ns-a", PROMPT) == 3  # every full block, from Valkey
    tier = drained(second)
    assert tier.stats().hits == 3
    assert tier.stats().writes == 0  # adopted blocks are not written back
    # the local tier answers from now on
    assert second.fetch_remote("ns-a", PROMPT) is None
    assert serve(second, "ns-a", PROMPT) == 3


def test_the_fetch_starts_after_the_local_prefix(replica: Replica) -> None:
    first, second = replica(), replica()
    serve(first, "ns-a", PROMPT)
    drained(first)
    serve(second, "ns-a", PROMPT[:BLOCK + 1])  # block 0 computed locally
    fetched = second.fetch_remote("ns-a", PROMPT)
    assert fetched is not None and fetched.start == 1 and len(fetched.blocks) == 2
    assert serve(second, "ns-a", PROMPT) == 3


def test_another_tenant_never_gets_the_blocks(replica: Replica, valkey: RedisServer) -> None:
    first, second = replica(), replica()
    serve(first, "ns-a", PROMPT)
    drained(first)
    assert second.fetch_remote("ns-b", PROMPT) is None
    # even with A's entries copied under B's keys (someone with Valkey access)
    client = valkey.client()
    a_keys = keys(valkey)
    serve(second, "ns-b", PROMPT)
    drained(second)
    b_keys = [k for k in keys(valkey) if k not in a_keys]
    for a, b in zip(a_keys, b_keys, strict=True):
        client.set(b, client.get(a) or b"")
    third = replica()
    assert serve(third, "ns-b", PROMPT) == 0
    assert drained(third).stats().rejected == 1


def test_a_colliding_entry_is_a_miss_never_wrong_kv(replica: Replica) -> None:
    """Every block hashes alike: the second prompt's keys hold the first prompt's pages."""
    def collide(data: bytes) -> bytes:
        return b"\x01" * 16

    first, second = replica(hash_fn=collide), replica(hash_fn=collide)
    serve(first, "ns-a", PROMPT)
    drained(first)
    other = [t + 1000 for t in PROMPT]
    assert serve(second, "ns-a", other) == 0  # kv_of checks any page it was given
    assert drained(second).stats().rejected == 1


@pytest.mark.parametrize("damage", ["tokens", "truncated", "page_size", "garbage"])
def test_a_tampered_entry_is_a_miss(replica: Replica, valkey: RedisServer, damage: str) -> None:
    first, second = replica(), replica()
    serve(first, "ns-a", PROMPT)
    tier = drained(first)
    client = valkey.client()
    values = {k: client.get(k) or b"" for k in keys(valkey)}
    # block 0's value holds the root digest as its parent; block 1's holds block 0's hash
    block0 = next(k for k, v in values.items() if first.root_of("ns-a") in v)
    hash0 = bytes.fromhex(block0.decode().removeprefix("kvgate:kv:"))
    block1 = next(k for k, v in values.items() if hash0 in v)
    value = values[block1]
    if damage == "tokens":  # a well-formed entry for the right key, with other token ids
        record = RemoteRecord(bytes.fromhex(block1.decode().removeprefix("kvgate:kv:")), hash0,
                              "ns-a", bytes(16), torch.zeros(first.layout.page_shape), 300)
        value = tier.encode(record)
    elif damage == "truncated":
        value = value[:-1]
    elif damage == "page_size":
        value = value + b"\0" * 4
    else:
        value = b"garbage"
    client.set(block1, value)
    assert serve(second, "ns-a", PROMPT) == 1  # block 0 only
    assert drained(second).stats().rejected == 1


def test_blocks_expire_with_their_ttl(replica: Replica, valkey: RedisServer) -> None:
    store = replica(ttl_s=0.3)
    serve(store, "ns-a", PROMPT)
    drained(store)
    assert all(0 < valkey.client().pttl(k) <= 300 for k in keys(valkey))
    deadline = time.monotonic() + 10
    while keys(valkey) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keys(valkey) == []
    assert replica().fetch_remote("ns-a", PROMPT) is None


def test_valkey_down_serving_goes_on_and_the_breaker_recovers(replica: Replica,
                                                               valkey: RedisServer) -> None:
    store = replica(breaker_cooldown_s=0.2)
    assert store.remote is not None
    tier = store.remote.tiers[0]
    valkey.kill()
    for i in range(4):  # commits and fetches never raise; errors open the breaker
        assert serve(store, f"ns-{i}", PROMPT) == 0
    tier.drain()
    stats = tier.stats()
    assert stats.errors >= 3 and not stats.available
    assert serve(store, "ns-0", PROMPT) == 3  # the local tier still answers
    valkey.start()  # same port
    deadline = time.monotonic() + 10
    while not tier.stats().available and time.monotonic() < deadline:
        store.fetch_remote("ns-x", PROMPT)  # the half-open trial call
        time.sleep(0.05)
    assert tier.stats().available
    serve(store, "ns-new", PROMPT)
    drained(store)
    assert len(keys(valkey)) == 3


def test_a_secret_rejects_entries_written_without_it(replica: Replica) -> None:
    writer, reader, other = replica(secret="s1"), replica(secret="s1"), replica(secret="s2")
    serve(writer, "ns-a", PROMPT)
    drained(writer)
    assert other.fetch_remote("ns-a", PROMPT) is None
    assert drained(other).stats().rejected == 1
    assert serve(reader, "ns-a", PROMPT) == 3


def test_a_full_queue_drops_and_demotion_writes_the_block_later(
        replica: Replica, valkey: RedisServer, layout: KVLayout) -> None:
    store = replica(device_pages=4, host_pages=8, queue_bytes=0)
    serve(store, "ns-a", PROMPT)
    assert store.remote is not None
    assert store.remote.tiers[0].stats().dropped == 3 and keys(valkey) == []
    tier = RemoteTier(RemoteTierConfig(url=valkey.url), layout, "demo")
    try:
        store.attach_tier(tier, None)
        serve(store, "ns-b", [7] * 13)  # evicts ns-a's blocks to the host: written then
        assert tier.drain()
        assert tier.stats().writes == 6  # 3 demoted + 3 committed
    finally:
        tier.close()


def test_a_valkey_that_never_answers_costs_a_timeout_then_nothing(layout: KVLayout) -> None:
    """A listener that accepts and never replies (a hung Valkey): each call ends at its
    timeout, and once the breaker opens, fetches and writes skip the network."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        store = CacheStore(layout, 16 * layout.page_bytes, 0)
        tier = RemoteTier(RemoteTierConfig(url=url, timeout_ms=50, breaker_cooldown_s=60),
                          layout, "demo")
        try:
            store.attach_tier(tier, None)
            for i in range(5):
                assert serve(store, f"ns-{i}", PROMPT) == 0
            assert tier.drain()
            stats = tier.stats()
            assert not stats.available and stats.errors >= 3 and stats.hits == 0
            assert stats.dropped > 0
        finally:
            tier.close()


def test_the_cost_model_can_decline_a_fetch(replica: Replica, layout: KVLayout) -> None:
    first, second = replica(), replica()
    serve(first, "ns-a", PROMPT)
    drained(first)
    assert second.remote is not None
    trivial = ModelShape(params=1, num_layers=1, num_q_heads=1, head_dim=1)  # nothing to compute
    second.remote.cost = CostModel(layout, trivial, 1e9, 0.0005, 1e15)
    assert serve(second, "ns-a", PROMPT) == 0
    assert drained(second).stats().skipped == 1


def test_a_flush_on_one_replica_empties_the_namespace_for_every_replica(replica: Replica) -> None:
    first, second, third = replica(), replica(), replica()
    serve(first, "ns-a", PROMPT)
    serve(first, "ns-b", PROMPT)
    drained(first)
    second.flush("ns-a")
    drained(second)
    assert third.fetch_remote("ns-a", PROMPT) is None  # written before the flush: a miss
    assert drained(third).stats().rejected == 1
    assert serve(third, "ns-b", PROMPT) == 3  # other namespaces keep theirs
    serve(third, "ns-a", PROMPT)  # computed again after the flush: shared again
    drained(third)
    assert serve(replica(), "ns-a", PROMPT) == 3


def test_disk_first_then_valkey_for_what_the_disk_lacks(layout: KVLayout, valkey: RedisServer,
                                                         tmp_path: Any) -> None:
    """Two tiers below the host: a restarted replica reads the blocks its disk holds, asks
    Valkey only for those after them, and writes what Valkey gave to its disk."""
    from kvgate.cachestore.disk_tier import DiskTier, DiskTierConfig

    pb = layout.page_bytes
    made: list[Any] = []

    def make() -> CacheStore:
        store = CacheStore(layout, 16 * pb, 0)
        disk = DiskTier(DiskTierConfig(path=str(tmp_path / "disk"), capacity_bytes=1 << 20),
                        layout, "demo")
        remote = RemoteTier(RemoteTierConfig(url=valkey.url, timeout_ms=200), layout, "demo")
        made.extend((disk, remote))
        store.attach_tier(disk, None)
        store.attach_tier(remote, None)
        return store

    try:
        first = make()
        assert serve(first, "t", PROMPT) == 0
        disk, remote = first.remote.tiers  # type: ignore[union-attr]
        assert disk.drain() and remote.drain()
        # the disk loses the last block (another replica had written all three to Valkey)
        path = next((tmp_path / "disk" / "kv").rglob(
            first.block_hashes("t", PROMPT)[2].hex()))
        path.unlink()
        disk.close()
        remote.close()
        second = make()
        fetched = second.fetch_remote("t", PROMPT)
        assert fetched is not None and fetched.sources == ["disk", "disk", "shared"]
        seq = second.open("s", "t")
        assert second.adopt_remote(seq, PROMPT, fetched) == 3
        match = second.match(seq, PROMPT)
        assert [tier for _, tier in match.blocks] == ["disk", "disk", "shared"]
        second.release(seq)
        disk2, remote2 = second.remote.tiers  # type: ignore[union-attr]
        assert disk2.stats().hits == 2 and remote2.stats().hits == 1
        # demoted later, the block Valkey gave goes to the disk, and nothing back to Valkey
        writes = remote2.stats().writes
        blocks = [second.index.get(h) for h in second.block_hashes("t", PROMPT)]
        second.remote.write_through([b for b in blocks if b is not None])  # type: ignore[union-attr]
        assert disk2.drain() and remote2.drain()
        assert disk2.stats().writes == 1 and remote2.stats().writes == writes
        assert path.exists()
    finally:
        for tier in made:
            tier.close()
