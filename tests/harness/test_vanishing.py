"""Clients that walk away mid-stream free their pages and pay for what was generated;
a client that reads slowly still gets everything and is billed once."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from testkit import Admin, ProcessServer, aiter_sse, request_body

LONG = 48


async def _greedy_runs_long(url: str, headers: dict, text: str) -> bool:
    """The demo model's weights are random: pick prompts whose greedy answer does not stop
    early, so abandoning the stream is what ends it."""
    path, body = request_body("chat", text, LONG, temperature=0)
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body,
                                                    headers=headers) as r:
        assert r.status == 200
        return (await r.json())["choices"][0]["finish_reason"] == "length"


async def _abandon(url: str, headers: dict, kind: str, text: str) -> str:
    path, body = request_body(kind, text, LONG, temperature=0)
    session = aiohttp.ClientSession()
    try:
        resp = await session.post(url + path, json=body, headers=headers)
        assert resp.status == 200
        request_id = resp.headers["x-request-id"]
        seen = 0
        async for _ in aiter_sse(resp):
            seen += 1
            if seen >= 4:
                break
        resp.close()  # drop the connection mid-stream
    finally:
        await session.close()
    return request_id


async def _wait_for(predicate, timeout_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.2)
    return False


async def test_abandoned_streams_free_pages_and_bill_partial_output(
        server: ProcessServer, admin: Admin) -> None:
    tenant = admin.tenant("vanish")
    candidates = [f"Tell me a long story, number {i}." for i in range(6)]
    runs_long = await asyncio.gather(*(_greedy_runs_long(server.url, tenant.headers, t)
                                       for t in candidates))
    texts = [t for t, ok in zip(candidates, runs_long, strict=True) if ok][:3]
    assert texts, "no prompt ran to max_tokens"
    kinds = ["chat-stream", "completions-stream", "messages-stream"]
    ids = await asyncio.gather(*(_abandon(server.url, tenant.headers, kinds[i], t)
                                 for i, t in enumerate(texts)))

    assert await _wait_for(lambda: admin.cache_stats()["blocks"]["active"] == 0), \
        f"pages still active after the clients left: {admin.cache_stats()['blocks']}"
    assert await _wait_for(lambda: all(i in server.ledger_rows(tenant.id) for i in ids)), \
        "an abandoned request was never billed"
    rows = server.ledger_rows(tenant.id)
    for request_id in ids:
        row = rows[request_id]
        assert row["n"] == 1
        assert row["status"] == "cancelled", row
        assert 0 < row["completion_tokens"] < LONG, row
        assert row["prompt_tokens"] > 0


async def test_slow_reader_gets_the_whole_stream_and_one_bill(
        server: ProcessServer, admin: Admin) -> None:
    tenant = admin.tenant("slow")
    path, body = request_body("chat-stream", "Read me slowly.", 24)
    async with aiohttp.ClientSession() as session, \
            session.post(server.url + path, json=body, headers=tenant.headers) as resp:
        assert resp.status == 200
        request_id = resp.headers["x-request-id"]
        events = []
        async for ev in aiter_sse(resp):
            events.append(ev.payload)
            await asyncio.sleep(0.05)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    row = server.ledger_rows(tenant.id)[request_id]
    assert row["status"] == "ok"
    assert row["completion_tokens"] == usage["completion_tokens"]
    assert row["prompt_tokens"] == usage["prompt_tokens"]


async def test_abandoned_plain_request_stops_the_engine_and_bills_partial_output(
        server: ProcessServer, admin: Admin) -> None:
    """A non-streamed request hears from the engine only at the end; its client leaving
    still stops the engine early and bills what was generated."""
    tenant = admin.tenant("vanish-plain")
    candidates = [f"Write a very long essay, take {i}." for i in range(6)]
    runs_long = await asyncio.gather(*(_greedy_runs_long(server.url, tenant.headers, t)
                                       for t in candidates))
    text = next((t for t, ok in zip(candidates, runs_long, strict=True) if ok), None)
    assert text is not None, "no prompt ran to max_tokens"
    budget = 2000  # far more than the engine makes before the client leaves
    path, body = request_body("chat", text, budget, temperature=0)
    before = set(server.ledger_rows(tenant.id))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as s:
        try:
            async with s.post(server.url + path, json=body, headers=tenant.headers) as r:
                await r.read()
            raise AssertionError(f"the request finished within a second: {r.status}")
        except TimeoutError:
            pass  # the client gives up and its connection closes

    def new_rows() -> list[dict]:
        return [r for i, r in server.ledger_rows(tenant.id).items() if i not in before]

    assert await _wait_for(lambda: len(new_rows()) == 1), "the abandoned request was not billed"
    (row,) = new_rows()
    assert row["status"] == "cancelled", row
    assert 0 < row["completion_tokens"] < budget, row
    assert await _wait_for(lambda: admin.cache_stats()["blocks"]["active"] == 0)
