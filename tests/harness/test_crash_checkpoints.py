"""SIGKILL in the middle of streams: what the clients received is billed after the restart,
from the last usage checkpoint (at most a second or 64 tokens short), and never twice."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp
import requests

from testkit import MiB, ProcessServer, Tenant

STREAMS = 200
RECEIPTS: dict[str, str] = {}  # request id -> the receipt id its client was given
EVERY = 64  # --checkpoint-tokens (the default)


async def _stream(session: aiohttp.ClientSession, url: str, tenant: Tenant, i: int,
                  got: dict[str, int], ids: dict[int, str], finished: set[str]) -> None:
    rng = random.Random(i)
    await asyncio.sleep(rng.uniform(0, 3))  # staggered: the kill finds each at its own point
    body = {"model": "demo", "max_tokens": rng.choice([20, 80, 300, 600]),
            "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"stream {i}: tell a long story"}]}
    try:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers=tenant.headers) as r:
            assert r.status == 200
            rid = r.headers["x-request-id"]
            ids[i] = rid
            RECEIPTS[rid] = r.headers["kvgate-receipt-id"]
            got[rid] = 0
            async for line in r.content:
                if line.startswith(b"data: {"):
                    data = json.loads(line[6:])
                    assert "choices" in data, data
                    delta = data["choices"]
                    if delta and delta[0]["delta"].get("content"):
                        got[rid] += 1  # at least one token per content chunk
                elif line.startswith(b"data: [DONE]"):
                    finished.add(rid)
    except (aiohttp.ClientError, ConnectionError, TimeoutError):
        pass  # the kill


async def test_sigkill_mid_stream_bills_what_was_delivered_once(workdir: Path) -> None:
    with ProcessServer(workdir, device_cache_bytes=32 * MiB, max_queue=STREAMS) as srv:
        tenant = srv.admin.tenant("ckpt")
        got: dict[str, int] = {}
        ids: dict[int, str] = {}
        finished: set[str] = set()
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                        connector=aiohttp.TCPConnector(limit=STREAMS))
        tasks = [asyncio.create_task(_stream(session, srv.url, tenant, i, got, ids, finished))
                 for i in range(STREAMS)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        # kill once some streams are done, some deep in and the rest anywhere
        while loop.time() < deadline and not (
                len(finished) >= 10 and sum(n > 2 * EVERY for n in got.values()) >= 10):
            await asyncio.sleep(0.02)
        await asyncio.to_thread(srv.kill)
        await asyncio.gather(*tasks)
        await session.close()
        cut = {rid: n for rid, n in got.items() if rid not in finished}
        assert finished and cut, "the kill should cut some streams and follow others' ends"
        assert any(n > 2 * EVERY for n in cut.values())

        srv.start()  # the same ledger and spool directory: the journal is adopted
        rows = srv.ledger_rows(tenant.id)
        assert all(r["n"] == 1 for r in rows.values()), "a request was billed twice"
        for rid in finished:
            assert rows[rid]["status"] == "ok"
            assert rows[rid]["completion_tokens"] >= got[rid]
        unbilled = 0
        for rid, n in cut.items():
            billed = rows[rid]["completion_tokens"] if rid in rows else 0
            if rid in rows:
                assert rows[rid]["status"] == "interrupted"
            assert billed >= n - EVERY, f"{rid}: {n} tokens received, {billed} billed"
            unbilled += max(0, n - billed)
        assert unbilled <= EVERY * len(cut)
        rid, n = max(cut.items(), key=lambda kv: kv[1])  # the signed receipt exists too
        receipt = requests.get(f"{srv.url}/v1/receipts/{RECEIPTS[rid]}", headers=tenant.headers,
                               timeout=30)
        assert receipt.status_code == 200, receipt.text
        assert rid in receipt.text and "interrupted" in receipt.text
        srv.kill()  # a second restart bills nothing again
        srv.start()
        assert srv.ledger_rows(tenant.id) == rows


def test_a_stream_killed_in_its_first_tokens_still_bills_its_prompt(workdir: Path) -> None:
    """Killed after a few tokens, well before the journal's interval or token count: the
    first checkpoint went with the first token, so the restart bills the prompt (and what
    was sent) as interrupted, once."""
    with ProcessServer(workdir, device_cache_bytes=32 * MiB) as srv:
        tenant = srv.admin.tenant("first-second")
        body = {"model": "demo", "max_tokens": 2000, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "a prompt worth billing " * 40}]}
        with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True,
                           headers=tenant.headers, timeout=60) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            chunks = 0
            for line in r.iter_lines():
                if line.startswith(b"data: {") and b'"content"' in line:
                    chunks += 1
                    if chunks == 12:  # fewer than --checkpoint-tokens
                        break
            srv.kill()
        srv.start()
        row = srv.ledger_rows(tenant.id)[rid]
        assert row["n"] == 1 and row["status"] == "interrupted"
        assert row["prompt_tokens"] > 40
