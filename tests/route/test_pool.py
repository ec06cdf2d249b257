"""The router's pool: a replica that answers its health polls late stays in it for a few
polls (a saturated CPU answers late, not never); one that refuses connections leaves at
once. A real aiohttp server on loopback plays the replica's ``/admin/load``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from kvgate.gateway.route import pool as pool_module
from kvgate.gateway.route.pool import ReplicaPool

LOAD = {"replica_id": "r1", "epoch": "e1", "model_id": "demo", "block_size": 16,
        "queue_depth": 0, "running": 0, "free_pages": 10, "device_pages": 10,
        "events": False, "event_seq": 0}


class Replica:
    def __init__(self) -> None:
        self.delay_s = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def load(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        return web.json_response(LOAD)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/admin/load", self.load)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def replica_pool(monkeypatch: pytest.MonkeyPatch
                       ) -> AsyncIterator[tuple[Replica, ReplicaPool]]:
    monkeypatch.setattr(pool_module, "POLL_TIMEOUT_S", 0.1)
    replica = Replica()
    await replica.start()

    async def new_epoch(_: object) -> None:
        return None

    async with aiohttp.ClientSession() as session:
        pool = ReplicaPool([replica.url], "admin-key", session, new_epoch)
        try:
            yield replica, pool
        finally:
            await pool.close()
            if replica.runner is not None:
                await replica.stop()


async def test_late_polls_keep_a_busy_replica_until_several_in_a_row(
        replica_pool: tuple[Replica, ReplicaPool]) -> None:
    replica, pool = replica_pool
    (r,) = pool.replicas.values()
    await pool.poll(r)
    assert r.healthy
    replica.delay_s = 0.3  # past the poll timeout
    for _ in range(pool_module.SLOW_POLLS - 1):
        await pool.poll(r)
        assert r.healthy, "a few late answers are a busy replica's, not a dead one's"
    replica.delay_s = 0.0
    await pool.poll(r)
    assert r.healthy and r.slow_polls == 0  # an answer in time starts the count again
    replica.delay_s = 0.3
    for _ in range(pool_module.SLOW_POLLS):
        await pool.poll(r)
    assert not r.healthy, f"{pool_module.SLOW_POLLS} late polls in a row take it out"
    replica.delay_s = 0.0
    await pool.poll(r)
    assert r.healthy


async def test_a_replica_that_refuses_connections_leaves_at_the_first_poll(
        replica_pool: tuple[Replica, ReplicaPool]) -> None:
    replica, pool = replica_pool
    (r,) = pool.replicas.values()
    await pool.poll(r)
    assert r.healthy
    await replica.stop()
    replica.runner = None
    await pool.poll(r)
    assert not r.healthy
