"""A small fleet on loopback: a real redis-server, replicas sharing one SQLite ledger (each
with its own spool), and a router in front of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from testkit.admin import ADMIN_KEY, Tenant
from testkit.ci import cannot_run
from testkit.redis_server import RedisServer, missing
from testkit.router import RouterThread
from testkit.server import MiB, Server, ThreadServer


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    reason = missing()
    if reason:
        cannot_run(reason)
    with RedisServer() as server:
        yield server.url


def replica_flags(workdir: Path, name: str, events_url: str) -> dict[str, Any]:
    return {"db": f"sqlite:///{workdir / 'ledger.db'}", "spool_dir": str(workdir / name),
            "events_url": events_url, "replica_id": name, "device_cache_bytes": 8 * MiB,
            "host_cache_bytes": 2 * MiB, "block_size": 16}


@dataclass
class Fleet:
    workdir: Path
    events_url: str
    replicas: list[Server]
    router: RouterThread
    tenant: Tenant
    extra: list[Any] = field(default_factory=list)

    def wait(self, check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def healthy(self) -> list[str]:
        return [r.url for r in self.router.router.pool.healthy()]

    def synced(self) -> bool:
        views = self.router.router.index.views
        return all(r.settings.events.replica_id in views and views[r.settings.events.replica_id].synced
                   for r in self.replicas if r.port)

    def chat(self, content: str, max_tokens: int = 4, **extra: Any) -> requests.Response:
        return requests.post(self.router.url + "/v1/chat/completions",
                             headers=self.tenant.headers, timeout=60,
                             json={"model": "demo", "max_tokens": max_tokens,
                                   "temperature": 0,
                                   "messages": [{"role": "user", "content": content}],
                                   **extra})


def start_fleet(workdir: Path, events_url: str, n: int = 2) -> Fleet:
    replicas: list[Server] = []
    for i in range(n):  # one by one: the first migrates the shared SQLite ledger
        replicas.append(ThreadServer(workdir / f"r{i}",
                                     **replica_flags(workdir, f"r{i}", events_url)).start())
    router = RouterThread(db=f"sqlite:///{workdir / 'ledger.db'}", admin_key=ADMIN_KEY,
                          replicas=[r.url for r in replicas], events_url=events_url).start()
    tenant = replicas[0].admin.tenant("route")
    fleet = Fleet(workdir, events_url, replicas, router, tenant)
    fleet.wait(lambda: len(fleet.healthy()) == n, "every replica in the pool")
    fleet.wait(fleet.synced, "every replica's cache view")
    return fleet


@pytest.fixture
def fleet(tmp_path: Path, redis_url: str) -> Iterator[Fleet]:
    f = start_fleet(tmp_path, redis_url)
    try:
        yield f
    finally:
        f.router.stop()
        for r in f.replicas + f.extra:
            r.close()
