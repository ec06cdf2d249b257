"""SIGKILL in the middle of mixed traffic: what the clients received is what the ledger holds.

The usage row is committed before a response's final bytes, so every response a client
received in full must be in the ledger, once, with the usage the client was shown; rows of
responses cut off by the crash may exist (billed work) but never twice.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import requests

from testkit import MiB, Outcome, ProcessServer, Tenant, request_body, send

KINDS = ("chat", "chat-stream", "completions", "completions-stream", "messages",
         "messages-stream")
SYSTEM = "You are the billing desk of a small shop. Answer briefly and politely. " * 3


async def _traffic(url: str, tenant: Tenant, outcomes: list[Outcome], stop: asyncio.Event,
                   worker: int, cut: list[int]) -> None:
    rng = random.Random(worker)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        n = 0
        while not stop.is_set():
            kind = KINDS[(worker + n) % len(KINDS)]
            prefix = SYSTEM if n % 2 == 0 else ""
            text = f"{prefix}worker {worker} turn {n}: {rng.random():.6f}"
            try:
                outcomes.append(await send(session, url, tenant, kind, text,
                                           max_tokens=rng.randint(4, 24)))
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                if stop.is_set():
                    cut.append(worker)  # this request was in flight when the server died
                    return
                await asyncio.sleep(0.05)
            n += 1


async def test_sigkill_mid_traffic_bills_every_received_response_once(workdir: Path) -> None:
    with ProcessServer(workdir, device_cache_bytes=8 * MiB) as srv:
        tenant = srv.admin.tenant("crash")
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        cut: list[int] = []
        workers = [asyncio.create_task(_traffic(srv.url, tenant, outcomes, stop, i, cut))
                   for i in range(6)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while sum(o.complete for o in outcomes) < 18 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        stop.set()  # workers stop after their current request, which the kill cuts off
        await asyncio.to_thread(srv.kill)
        await asyncio.gather(*workers)

        assert cut, "the kill landed between requests; nothing was in flight"
        done = [o for o in outcomes if o.complete]
        assert len(done) >= 18, f"only {len(done)} responses completed before the kill"
        assert {o.kind for o in done} == set(KINDS)

        srv.start()  # same ledger file
        rows = srv.ledger_rows(tenant.id)
        for o in done:
            assert o.request_id in rows, f"{o.kind} {o.request_id} was received but not billed"
            row = rows[o.request_id]
            assert row["status"] == "ok"
            assert o.usage is not None
            got = {k: row[k] for k in ("prompt_tokens", "cached_tokens", "completion_tokens")}
            assert got == o.usage, f"{o.kind} {o.request_id}: ledger {got} != client {o.usage}"
        assert all(r["n"] == 1 for r in rows.values()), "a request was billed twice"
        assert len(rows) <= len(outcomes) + 6, "more rows than requests sent"

        report = srv.admin.usage(tenant.id)
        assert report["requests"] == len(rows)
        assert report["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows.values())
        assert report["completion_tokens"] == sum(r["completion_tokens"] for r in rows.values())

        path, body = request_body("chat", "back again?", 4)
        r = requests.post(srv.url + path, json=body, headers=tenant.headers, timeout=60)
        assert r.status_code == 200
        assert r.headers["x-request-id"] in srv.ledger_rows(tenant.id)
