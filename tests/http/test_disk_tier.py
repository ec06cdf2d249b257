"""The disk tier through a real server and the OpenAI SDK: a replica restarted on the same
--disk-cache-dir (host tier tiny, no Valkey) reads a long prompt's blocks from its disk and
bills them as a cache read; a flush before the restart makes them a miss; two replicas
cannot share one directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from kvgate.gateway.engine.request import EngineMisconfigured
from testkit import client
from testkit.admin import ADMIN_KEY, Tenant
from testkit.server import MiB, ThreadServer

SYSTEM = ("You are the support assistant of a company that sells garden tools, and you "
          "answer in one short sentence. " * 24).strip()


def flags(tmp_path: Path) -> dict[str, Any]:
    return {"disk_cache_dir": str(tmp_path / "kv-disk"), "disk_cache_bytes": 256 * MiB,
            "host_cache_bytes": MiB // 4}


def ask(server: ThreadServer, tenant: Tenant, question: str = "Which rake?") -> Any:
    return client.ask(server.url, tenant, SYSTEM, question)


def disk_stats(server: ThreadServer) -> dict[str, Any]:
    stats = server.admin.cache_stats()["disk"]
    assert isinstance(stats, dict)
    return stats


def test_a_restarted_replica_reads_a_long_prompt_from_its_disk(tmp_path: Path) -> None:
    server = ThreadServer(tmp_path / "one", **flags(tmp_path)).start()
    try:
        alice = server.admin.tenant("alice")
        first = ask(server, alice)
        assert client.cached_tokens(first) == 0 and first.usage.prompt_tokens > 256
        server.drain_remote()
        assert disk_stats(server)["writes"] >= first.usage.prompt_tokens // 16
        server.stop()
        server.start()  # same working directory and disk directory; empty device and host
        assert disk_stats(server)["files"] >= first.usage.prompt_tokens // 16
        second = ask(server, alice)
        # every full block of the prompt (less its last token, which is always computed)
        full = (second.usage.prompt_tokens - 1) // 16 * 16
        assert client.cached_tokens(second) == full > 256
        assert second.choices[0].message.content == first.choices[0].message.content
        stats = disk_stats(server)
        assert stats["hits"] * 16 == full and stats["errors"] == 0
        # billed as a cache read, once per request
        rows = server.ledger_rows(alice.id)
        assert len(rows) == 2 and all(r["n"] == 1 for r in rows.values())
        by_cached = sorted(rows.values(), key=lambda r: r["cached_tokens"])
        assert by_cached[0]["cached_tokens"] == 0 and by_cached[0]["cache_write_tokens"] > 0
        assert by_cached[1]["cached_tokens"] == full
        # ... never also as a write (only what follows the cached prefix is written)
        assert by_cached[1]["cached_tokens"] + by_cached[1]["cache_write_tokens"] <= \
            by_cached[1]["prompt_tokens"]
        assert by_cached[1]["cache_write_tokens"] <= 16
        assert server.admin.usage(alice.id)["cached_tokens"] == full
        metrics = requests.get(server.url + "/metrics", timeout=10,
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        assert f'kvgate_disk_tier_blocks_total{{kind="hit"}} {float(full // 16)}' in metrics
        assert "kvgate_disk_tier_errors_total 0.0" in metrics
        # another tenant with the same prompt reads nothing of alice's
        bob = server.admin.tenant("bob")
        assert client.cached_tokens(ask(server, bob)) == 0
        assert disk_stats(server)["hits"] * 16 == full
    finally:
        server.close()


def test_a_flush_reaches_the_disk_before_a_restart(tmp_path: Path) -> None:
    server = ThreadServer(tmp_path / "one", **flags(tmp_path)).start()
    try:
        alice = server.admin.tenant("alice")
        ask(server, alice)
        server.drain_remote()
        server.admin.flush(alice.id)
        server.drain_remote()
        server.stop()
        server.start()
        assert client.cached_tokens(ask(server, alice)) == 0
        assert disk_stats(server)["hits"] == 0
    finally:
        server.close()


def test_two_replicas_cannot_share_a_directory(tmp_path: Path) -> None:
    with ThreadServer(tmp_path / "one", **flags(tmp_path)):
        other = ThreadServer(tmp_path / "two", **flags(tmp_path))
        with pytest.raises(EngineMisconfigured, match="in use by another kvgate process"):
            other.start()
        other.close()


def test_a_directory_kvgate_did_not_make_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kv-disk").mkdir()
    (tmp_path / "kv-disk" / "notes.txt").write_text("the operator's")
    server = ThreadServer(tmp_path / "one", **flags(tmp_path))
    with pytest.raises(EngineMisconfigured, match="is not empty and holds no kvgate-disk-tier"):
        server.start()
    server.close()
    assert sorted(p.name for p in (tmp_path / "kv-disk").iterdir()) == ["notes.txt"]


def test_the_disk_tier_is_off_by_default(tmp_path: Path) -> None:
    with ThreadServer(tmp_path / "one") as server:
        assert server.admin.cache_stats()["disk"] is None
        assert server.state.engine.remote is None
