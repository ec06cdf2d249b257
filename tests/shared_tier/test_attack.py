"""The shared tier against a Valkey that holds garbage: whatever sits under the tier's keys
(an epoch that is not a number, a key of another type, truncated values), a replica's
writes go on for every other namespace and its fetches are misses, never errors."""

from __future__ import annotations

import pytest

from tests.shared_tier.conftest import RedisServer
from tests.shared_tier.test_store_tier import (  # noqa: F401 (fixtures)
    PROMPT,
    Replica,
    drained,
    keys,
    layout,
    replica,
    serve,
)


@pytest.mark.parametrize("epoch", [b"garbage", b"-5", b"99999999999999999999999", b"1.5"])
def test_a_garbage_epoch_never_stops_the_writer(replica: Replica, valkey: RedisServer,
                                                epoch: bytes) -> None:
    valkey.client().set("kvgate:kv:epoch:ns-bad", epoch)
    store = replica()
    assert serve(store, "ns-bad", PROMPT) == 0  # its writes fail: never the request
    assert store.fetch_shared("ns-bad", PROMPT) is None
    tier = drained(store)  # the writer thread is still there to drain the queue
    serve(store, "ns-good", PROMPT)
    drained(store)
    assert tier.stats().writes == 3 and len(keys(valkey)) == 3 + 1  # ns-good's + the epoch
    assert serve(replica(), "ns-good", PROMPT) == 3
    assert serve(replica(), "ns-bad", PROMPT) == 0


def test_keys_of_another_type_are_misses(replica: Replica, valkey: RedisServer) -> None:
    first = replica()
    serve(first, "ns-a", PROMPT)
    drained(first)
    client = valkey.client()
    data_keys = [k for k in keys(valkey) if b"epoch" not in k]
    client.delete(data_keys[0])
    client.hset(data_keys[0], "x", "y")  # a hash where a page should be
    client.rpush("kvgate:kv:epoch:ns-a", "z")  # a list where the epoch should be
    second = replica()
    assert serve(second, "ns-a", PROMPT) < 3  # ``serve`` checks every block it was given
    second.flush("ns-a")  # INCR on a list fails: logged, counted, never raised
    drained(second)
    serve(second, "ns-b", PROMPT)
    drained(second)
    assert serve(replica(), "ns-b", PROMPT) == 3
