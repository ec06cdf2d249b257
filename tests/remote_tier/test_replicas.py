"""Replicas sharing one Valkey and one ledger, through real servers and the OpenAI SDK:
a prompt answered on one replica is a cache read on another (and on a restarted one),
never for another tenant; with Valkey gone, every request is still answered and billed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from testkit import client
from testkit.admin import ADMIN_KEY, Tenant
from testkit.server import ThreadServer
from tests.remote_tier.conftest import RedisServer

SYSTEM = ("You are the support assistant of a company that sells garden tools. " * 8).strip()


@pytest.fixture
def fleet(tmp_path: Path, valkey: RedisServer) -> Iterator[dict[str, Any]]:
    flags = {"db": f"sqlite:///{tmp_path / 'ledger.db'}", "shared_tier_url": valkey.url,
             "shared_tier_timeout_ms": 200, "host_cache_bytes": 0}
    servers: list[ThreadServer] = []

    def replica(name: str) -> ThreadServer:
        server = ThreadServer(tmp_path / name, **flags).start()
        servers.append(server)
        return server

    yield {"replica": replica, "flags": flags}
    for server in servers:
        server.close()


def ask(server: ThreadServer, tenant: Tenant, question: str = "Which rake?") -> Any:
    return client.ask(server.url, tenant, SYSTEM, question)


def remote_stats(server: ThreadServer) -> dict[str, Any]:
    stats = server.admin.cache_stats()["shared"]
    assert isinstance(stats, dict)
    return stats


def test_a_prompt_from_one_replica_is_a_cache_read_on_another(fleet: dict[str, Any]) -> None:
    one = fleet["replica"]("one")
    alice, bob = one.admin.tenant("alice"), one.admin.tenant("bob")
    first = ask(one, alice)
    assert client.cached_tokens(first) == 0
    one.drain_remote()
    two = fleet["replica"]("two")
    second = ask(two, alice)
    # every full block of the prompt (less its last token, which is always computed)
    assert client.cached_tokens(second) == (second.usage.prompt_tokens - 1) // 16 * 16 > 0
    assert remote_stats(one)["writes"] >= client.cached_tokens(second) // 16
    assert second.choices[0].message.content == first.choices[0].message.content
    hits = remote_stats(two)["hits"]
    assert hits * 16 == client.cached_tokens(second)
    # another tenant with the same prompt finds nothing, here or in Valkey
    third = ask(two, bob)
    assert client.cached_tokens(third) == 0
    assert remote_stats(two)["hits"] == hits
    # billed once each, the cache read as a cache read
    rows = one.ledger_rows()
    assert len(rows) == 3 and all(r["n"] == 1 for r in rows.values())
    assert sorted(r["cached_tokens"] for r in rows.values()) == [0, 0, client.cached_tokens(second)]
    assert one.admin.usage(alice.id)["cached_tokens"] == client.cached_tokens(second)
    metrics = requests.get(two.url + "/metrics", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert f'kvgate_shared_tier_blocks_total{{kind="hit"}} {float(hits)}' in metrics


def test_a_restarted_replica_warms_from_the_remote_tier(fleet: dict[str, Any]) -> None:
    one = fleet["replica"]("one")
    alice = one.admin.tenant("alice")
    ask(one, alice)
    one.drain_remote()
    one.close()
    again = fleet["replica"]("one")  # same workdir, empty device tier
    assert client.cached_tokens(ask(again, alice, "Which hoe?")) > 0


def test_with_valkey_killed_every_request_is_answered_and_billed_once(
        fleet: dict[str, Any], valkey: RedisServer) -> None:
    one = fleet["replica"]("one")
    alice = one.admin.tenant("alice")
    ask(one, alice)
    one.drain_remote()
    valkey.kill()
    two = fleet["replica"]("two")
    answers = [ask(two, alice, f"Question {i}?") for i in range(5)]
    answers += [ask(one, alice, f"Question {i}?") for i in range(3)]
    assert all(a.choices[0].message.content is not None for a in answers)
    assert client.cached_tokens(answers[1]) > 0  # the local tier still serves what replica two computed
    rows = one.ledger_rows(alice.id)
    assert len(rows) == 9 and all(r["n"] == 1 for r in rows.values())
    stats = remote_stats(two)
    assert stats["errors"] >= 1 and stats["hits"] == 0


def test_an_admin_flush_reaches_the_remote_tier(fleet: dict[str, Any]) -> None:
    one = fleet["replica"]("one")
    alice = one.admin.tenant("alice")
    ask(one, alice)
    one.drain_remote()
    one.admin.flush(alice.id)
    one.drain_remote()
    two = fleet["replica"]("two")
    assert client.cached_tokens(ask(two, alice)) == 0
    assert remote_stats(two)["hits"] == 0
