"""A flushed namespace stays flushed whatever happens to its epoch key in Valkey: deleted
(by anyone, or by Valkey's own LRU eviction), played back to the value it had before the
flush, forged without the secret, or copied from another namespace. Each is a miss for
every replica that has seen the flush, and the next write replaces the key with an epoch
newer than any seen, after which a replica started later misses the flushed entries too."""

from __future__ import annotations

import pytest

from kvgate.cachestore.remote_tier import RemoteTier, RemoteTierConfig
from kvgate.kernels.layout import KVLayout
from tests.remote_tier import test_store_tier
from tests.remote_tier.conftest import RedisServer
from tests.remote_tier.test_store_tier import PROMPT, Replica, drained, serve

# the fixtures these tests use
layout = test_store_tier.layout
replica = test_store_tier.replica

EPOCH_KEY = "kvgate:kv:epoch:ns-a"
OTHER = [t + 500 for t in PROMPT]  # other prompts of the same tenant (other keys)
THIRD = [t + 900 for t in PROMPT]


@pytest.mark.parametrize("secret", ["", "mac-key"])
def test_an_epoch_played_back_revives_nothing(replica: Replica, valkey: RedisServer,
                                              secret: str) -> None:
    client = valkey.client()
    first = replica(secret=secret)
    serve(first, "ns-a", PROMPT)
    drained(first)
    recorded = client.get(EPOCH_KEY)  # what someone with access to Valkey saw
    assert recorded is not None
    assert serve(replica(secret=secret), "ns-a", PROMPT) == 3  # shared before the flush
    flusher = replica(secret=secret)
    flusher.flush("ns-a")
    drained(flusher)
    user = replica(secret=secret)  # a replica serving the tenant after the flush
    assert serve(user, "ns-a", OTHER) == 0
    drained(user)
    assert user.fetch_remote("ns-a", PROMPT) is None
    client.set(EPOCH_KEY, recorded)  # rolled back
    for seen in (flusher, user):  # both have seen the newer epoch: a played-back one is refused
        rejected = drained(seen).stats().rejected
        assert seen.fetch_remote("ns-a", PROMPT) is None
        assert drained(seen).stats().rejected == rejected + 1
    serve(user, "ns-a", THIRD)  # its next write replaces the epoch with a newer one
    drained(user)
    assert client.get(EPOCH_KEY) != recorded
    late = replica(secret=secret)  # started after all of it: the flushed entries are gone
    assert late.fetch_remote("ns-a", PROMPT) is None
    assert serve(late, "ns-a", THIRD) == 3  # what was written since is shared


@pytest.mark.parametrize("secret", ["", "mac-key"])
def test_a_deleted_epoch_key_revives_nothing(replica: Replica, valkey: RedisServer,
                                             secret: str) -> None:
    """Deleted by anyone, or evicted by Valkey's allkeys-lru before the entries."""
    client = valkey.client()
    first = replica(secret=secret)
    serve(first, "ns-a", PROMPT)
    drained(first)
    flusher = replica(secret=secret)
    flusher.flush("ns-a")
    drained(flusher)
    client.delete(EPOCH_KEY)
    assert flusher.fetch_remote("ns-a", PROMPT) is None
    assert replica(secret=secret).fetch_remote("ns-a", PROMPT) is None  # no epoch: no entry
    writer = replica(secret=secret)
    serve(writer, "ns-a", OTHER)  # makes a new epoch
    drained(writer)
    assert client.get(EPOCH_KEY) is not None
    assert replica(secret=secret).fetch_remote("ns-a", PROMPT) is None
    assert serve(replica(secret=secret), "ns-a", OTHER) == 3


def test_an_epoch_forged_without_the_secret_is_refused(replica: Replica,
                                                        valkey: RedisServer) -> None:
    """The entries' own header names the epoch they were written under: with the secret,
    writing that number back (unsigned, or with another namespace's MAC) does not verify."""
    client = valkey.client()
    first = replica(secret="mac-key")
    serve(first, "ns-a", PROMPT)
    serve(first, "ns-b", PROMPT)
    drained(first)
    before = client.get(EPOCH_KEY)
    assert before is not None
    number, _, mac = before.partition(b".")
    other_mac = (client.get("kvgate:kv:epoch:ns-b") or b"").partition(b".")[2]
    flusher = replica(secret="mac-key")
    flusher.flush("ns-a")
    drained(flusher)
    assert mac and other_mac
    for forged in (number, number + b"." + other_mac, number + b"." + b"0" * 64):
        client.set(EPOCH_KEY, forged)
        fresh = replica(secret="mac-key")  # has seen nothing: only the MAC protects it
        assert fresh.fetch_remote("ns-a", PROMPT) is None, forged
        assert drained(fresh).stats().rejected == 1


def test_an_epoch_value_is_bound_to_its_namespace_and_secret(layout: KVLayout,
                                                              valkey: RedisServer) -> None:
    tiers = [RemoteTier(RemoteTierConfig(url=valkey.url, secret=s), layout, "demo")
             for s in ("k1", "k1", "k2", "")]
    try:
        one, same, other, unsigned = tiers
        value = one.epoch_value("ns-a", 12345)
        assert same.parse_epoch("ns-a", value) == 12345
        assert same.parse_epoch("ns-b", value) is None
        assert other.parse_epoch("ns-a", value) is None
        assert same.parse_epoch("ns-a", b"12345") is None
        assert unsigned.parse_epoch("ns-a", b"12345") == 12345
        assert same.parse_epoch("ns-a", None) == 0  # no epoch: nothing is current
        # and never lower than one seen (played back)
        assert same.parse_epoch("ns-a", one.epoch_value("ns-a", 12344)) is None
        assert same.parse_epoch("ns-a", one.epoch_value("ns-a", 12346)) == 12346
    finally:
        for tier in tiers:
            tier.close()
