"""The remote tier against a Valkey that holds garbage or hangs: whatever sits under the
tier's keys (an epoch that is not one kvgate wrote, a key of another type), a replica's
fetches are misses, never errors, and its next write replaces the epoch; a hung Valkey
holds no request and no event loop; writes alone close the breaker once Valkey is back."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Any

import pytest
import requests

from kvgate.cachestore import CacheStore
from kvgate.gateway.protocol.namespace import tenant_namespace
from testkit import client
from tests.remote_tier import test_replicas, test_store_tier
from tests.remote_tier.conftest import RedisServer
from tests.remote_tier.test_replicas import ask, remote_stats
from tests.remote_tier.test_store_tier import BLOCK, PROMPT, Replica, drained, keys, kv_of, serve

# the fixtures of the tests these attack
layout = test_store_tier.layout
replica = test_store_tier.replica
fleet = test_replicas.fleet


@pytest.mark.parametrize("epoch", [b"garbage", b"-5", b"9" * 19, b"1.5",
                                   b"0", b"7 ", b"+7"])
def test_a_garbage_epoch_is_replaced_and_never_stops_the_writer(
        replica: Replica, valkey: RedisServer, epoch: bytes) -> None:
    client = valkey.client()
    client.set("kvgate:kv:epoch:ns-bad", epoch)
    store = replica()
    assert store.fetch_remote("ns-bad", PROMPT) is None  # nothing under it is trusted
    tier = drained(store)
    assert tier.stats().rejected == 1
    assert serve(store, "ns-bad", PROMPT) == 0  # computed; written under a new epoch
    drained(store)
    assert client.get("kvgate:kv:epoch:ns-bad") != epoch
    serve(store, "ns-good", PROMPT)
    drained(store)
    assert tier.stats().writes == 6 and len(keys(valkey)) == 6
    assert serve(replica(), "ns-good", PROMPT) == 3
    assert serve(replica(), "ns-bad", PROMPT) == 3


def test_keys_of_another_type_are_misses(replica: Replica, valkey: RedisServer) -> None:
    first = replica()
    serve(first, "ns-a", PROMPT)
    drained(first)
    client = valkey.client()
    data_keys = [k for k in keys(valkey) if b"epoch" not in k]
    client.delete(data_keys[0])
    client.hset(data_keys[0], "x", "y")  # a hash where a page should be
    client.delete("kvgate:kv:epoch:ns-a")
    client.rpush("kvgate:kv:epoch:ns-a", "z")  # a list where the epoch should be
    second = replica()
    assert serve(second, "ns-a", PROMPT) < 3  # ``serve`` checks every block it was given
    second.flush("ns-a")  # the list is replaced by an epoch: never raised
    drained(second)
    assert serve(replica(), "ns-a", PROMPT) == 0  # flushed
    serve(second, "ns-b", PROMPT)
    drained(second)
    assert serve(replica(), "ns-b", PROMPT) == 3


def commit_only(store: CacheStore, namespace: str, tokens: list[int]) -> None:
    """A request whose blocks are written through without any fetch before them (its
    prompt a local hit, its new blocks generated output)."""
    seq = store.open(f"c{time.monotonic_ns()}", namespace)
    store.match(seq, tokens)
    assert store.allocate(seq, len(tokens))
    for i in range(len(tokens) // BLOCK):
        store.device.tensor[seq.block_table[i]] = kv_of(namespace, i, tokens, store.layout)
    store.commit(seq, tokens)
    store.release(seq)


def test_writes_alone_close_the_breaker_once_valkey_is_back(replica: Replica,
                                                            valkey: RedisServer) -> None:
    store = replica(breaker_cooldown_s=0.2)
    tier = drained(store)
    valkey.kill()
    for i in range(4):
        commit_only(store, f"ns-{i}", PROMPT)
        tier.drain()
    assert not tier.stats().available
    valkey.start()
    deadline = time.monotonic() + 10
    i = 0
    while not tier.stats().available and time.monotonic() < deadline:
        i += 1
        commit_only(store, f"ns-new-{i}", PROMPT)  # never a fetch: only writes can try
        tier.drain()
        time.sleep(0.05)
    assert tier.stats().available
    commit_only(store, "ns-last", PROMPT)
    drained(store)
    assert serve(replica(), "ns-last", PROMPT) == 3


def test_through_servers_a_spoiled_epoch_is_replaced_and_shared_again(
        fleet: dict[str, Any], valkey: RedisServer) -> None:
    one = fleet["replica"]("one")
    alice, bob = one.admin.tenant("alice"), one.admin.tenant("bob")
    valkey.client().set(f"kvgate:kv:epoch:{tenant_namespace(alice.id)}", b"not a number")
    assert client.cached_tokens(ask(one, alice)) == 0  # answered; written under a new epoch
    ask(one, bob)
    one.drain_remote()  # the writer is alive and wrote both tenants' blocks
    two = fleet["replica"]("two")
    assert client.cached_tokens(ask(two, alice)) > 0
    assert client.cached_tokens(ask(two, bob)) > 0
    rows = one.ledger_rows()
    assert len(rows) == 4 and all(r["n"] == 1 for r in rows.values())


def test_a_hung_valkey_never_holds_a_request_or_the_event_loop(
        fleet: dict[str, Any], valkey: RedisServer) -> None:
    one = fleet["replica"]("one")
    alice, bob = one.admin.tenant("alice"), one.admin.tenant("bob")
    ask(one, alice)
    one.drain_remote()
    two = fleet["replica"]("two")
    assert valkey.proc is not None
    os.kill(valkey.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            asked = [pool.submit(ask, two, bob if i % 2 else alice, f"Hung {i}?")
                     for i in range(6)]
            health = [requests.get(two.url + "/healthz", timeout=30).status_code
                      for _ in range(5)]
            answers = [f.result() for f in asked]
        assert health == [200] * 5
        assert all(a.choices[0].message.content is not None for a in answers)
        assert not remote_stats(two)["available"]
    finally:
        os.kill(valkey.proc.pid, signal.SIGCONT)
    rows = one.ledger_rows()
    assert len(rows) == 7 and all(r["n"] == 1 for r in rows.values())
