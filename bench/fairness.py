"""Fair share of compute and money: does one tenant's flood, stall or spending hurt another?

Each scenario runs a ``kvgate serve`` child (demo model, SQLite ledger in a temporary
directory) with tenants made through the admin API, all on loopback:

- **flood**: a victim tenant sends a short streaming chat request once a second; its time
  to first token (TTFT, to the first content chunk) is measured alone, then while a flood
  tenant keeps ``--flood-clients`` (64) requests with ~1.5k-character prompts and 48 output
  tokens running back to back. Three servers: the defaults (fair order, short steps while
  tenants compete); fair order with ``--contended-batch-tokens 0``; and
  ``--fair-scheduling 0`` (first come, first served: the baseline). Each ratio is against
  its own server's alone figure; the flood's output tokens per second show what the
  victim's share costs it.
- **stalled**: the flood tenant opens 12 streaming requests (large ``max_tokens``) whose
  clients never read a byte (``--max-queue 4 --max-running 8``, the configuration that
  kept every other tenant at 503 for 40 s); the victim's statuses and TTFT meanwhile. The
  two scenarios below run on the same server.
- **tpm**: a tenant limited to 500 tokens per minute sends 12 concurrent completions of
  ``max_tokens`` 400: the tokens it is served in the window (goal ≤ 500 + one request).
- **budget**: a tenant with a 1,000 µ daily budget sends requests until it is refused: its
  spend against the budget (goal: never above it by more than one request's worst case).

Run: ``python -m bench.fairness [--duration 60] [--flood-clients 64]``. Writes
``bench/results/fairness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.common import print_table, smoke, write_result
from testkit import ProcessServer
from testkit.slow_client import stalled_request

VICTIM_TEXT = "How are you today?"
# The flood runs under each: the default; fair order without short contended steps; FCFS
MODES: dict[str, dict[str, Any]] = {
    "fair": {}, "fair, long steps": {"contended_batch_tokens": 0},
    "fifo": {"fair_scheduling": False}}
# tpm: the tenant's tokens per minute and each of its 12 requests' max_tokens (a smoke run
# scales both down: one request served, the rest refused, a tenth of the decoding)
TPM_LIMIT, TPM_MAX_TOKENS = smoke(500, 100), smoke(400, 40)
FLOOD_TEXT = ("The ledger bills every tenant for uncached, cached and written tokens. " * 22)[:1500]


def _pct(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    a = np.array(samples) * 1000.0
    return {"n": len(samples), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1)}


def _chat(text: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "demo", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": text}]}


async def _victim_once(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                       ttfts: list[float], statuses: Counter[int]) -> None:
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=_chat(VICTIM_TEXT, 4, True),
                            headers=headers) as r:
        statuses[r.status] += 1
        if r.status != 200:
            await r.read()
            return
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - t0
        if first is not None:
            ttfts.append(first)


async def _victim(url: str, headers: dict[str, str], until: float) -> dict[str, Any]:
    """One request a second (each in its own task, so a slow one does not delay the next)."""
    ttfts: list[float] = []
    statuses: Counter[int] = Counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        while time.perf_counter() < until:
            tasks.append(asyncio.create_task(_victim_once(session, url, headers, ttfts,
                                                          statuses)))
            await asyncio.sleep(1.0)
        await asyncio.gather(*tasks, return_exceptions=True)
    return {**_pct(ttfts), "statuses": {str(k): v for k, v in sorted(statuses.items())}}


async def _flood_client(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                        until: float, counts: Counter[str]) -> None:
    body = _chat(FLOOD_TEXT, 48, False)
    while time.perf_counter() < until:
        try:
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers=headers) as r:
                data = await r.read()
                counts[str(r.status)] += 1
                if r.status == 200:
                    counts["tokens"] += json.loads(data)["usage"]["completion_tokens"]
                else:
                    await asyncio.sleep(0.2)
        except (TimeoutError, aiohttp.ClientError):
            counts["error"] += 1


async def flood(url: str, flood_h: dict[str, str], victim_h: dict[str, str], alone_s: float,
                duration: float, clients: int) -> dict[str, Any]:
    alone = await _victim(url, victim_h, time.perf_counter() + alone_s)
    counts: Counter[str] = Counter()
    until = time.perf_counter() + duration
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        flooders = [asyncio.create_task(_flood_client(session, url, flood_h, until, counts))
                    for _ in range(clients)]
        await asyncio.sleep(min(5.0, duration / 6))  # the flood is running before we look
        loaded = await _victim(url, victim_h, until)
        await asyncio.gather(*flooders)
    return {"alone": alone, "flooded": loaded, "ratio": _ratio(loaded, alone),
            "flood": dict(counts), "flood_tokens_per_s": round(counts["tokens"] / duration, 1)}


def _ratio(loaded: dict[str, Any], alone: dict[str, Any]) -> dict[str, float | None]:
    return {q: round(loaded[q] / alone[q], 2) if loaded[q] and alone[q] else None
            for q in ("p50_ms", "p99_ms")}


async def stalled(url: str, port: int, flood_key: str, victim_h: dict[str, str],
                  alone_s: float, duration: float) -> dict[str, Any]:
    alone = await _victim(url, victim_h, time.perf_counter() + alone_s)
    body = _chat("Tell me a very long story. " * 4, 4000, True)
    socks = [stalled_request(port, "/v1/chat/completions", body,
                             {"Authorization": f"Bearer {flood_key}"}) for _ in range(12)]
    try:
        await asyncio.sleep(2.0)
        loaded = await _victim(url, victim_h, time.perf_counter() + duration)
    finally:
        for s in socks:
            s.close()
    return {"alone": alone, "with_stalled_readers": loaded, "ratio": _ratio(loaded, alone),
            "victim_503": loaded["statuses"].get("503", 0)}


async def tpm(url: str, headers: dict[str, str], limit: int) -> dict[str, Any]:
    body = {"model": "demo", "prompt": "Count to one hundred:", "max_tokens": TPM_MAX_TOKENS,
            "ignore_eos": True}
    statuses: Counter[int] = Counter()
    served = [0]
    biggest = [0]

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
            statuses[r.status] += 1
            data = await r.json()
            if r.status == 200:
                n = int(data["usage"]["total_tokens"])
                served[0] += n
                biggest[0] = max(biggest[0], n)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(one(session) for _ in range(12)))
    return {"limit": limit, "tokens_served": served[0], "largest_request": biggest[0],
            "bound": limit + biggest[0], "held": served[0] <= limit + max(biggest[0], 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


async def budget(url: str, headers: dict[str, str], admin: Any, tenant_id: int,
                 limit: int) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    refusal = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(400):
            async with session.post(url + "/v1/chat/completions",
                                    json=_chat(VICTIM_TEXT, 16, False), headers=headers) as r:
                statuses[r.status] += 1
                if r.status == 429:
                    refusal = {"retry_after": r.headers.get("Retry-After"),
                               "error": (await r.json())["error"]}
                    break
    spent = int(admin.usage(tenant_id)["cost_micros"])
    return {"budget_micros": limit, "spent_micros": spent, "over_budget_micros": spent - limit,
            "requests": {str(k): v for k, v in sorted(statuses.items())}, "refusal": refusal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=smoke(60.0, 3.0),
                    help="seconds of each loaded phase")
    ap.add_argument("--alone", type=float, default=smoke(20.0, 2.0),
                    help="seconds the victim is measured alone")
    ap.add_argument("--flood-clients", type=int, default=smoke(64, 4))
    ap.add_argument("--only", default="flood,stalled,tpm,budget",
                    help="comma-separated scenarios to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    result: dict[str, Any] = {"config": {"duration_s": args.duration, "alone_s": args.alone,
                                         "flood_clients": args.flood_clients}}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvgate-fairness-") as tmp:
        if "flood" in only:
            for mode, flags in smoke(MODES, {"fair": {}}).items():
                with ProcessServer(Path(tmp) / mode, model="demo", **flags) as server:
                    f = server.admin.tenant("flood")
                    v = server.admin.tenant("victim")
                    r = asyncio.run(flood(server.url, f.headers, v.headers, args.alone,
                                          args.duration, args.flood_clients))
                result.setdefault("flood", {})[mode] = r
                rows.append({"scenario": f"flood ({mode})", "alone_p50": r["alone"]["p50_ms"],
                             "alone_p99": r["alone"]["p99_ms"],
                             "loaded_p50": r["flooded"]["p50_ms"],
                             "loaded_p99": r["flooded"]["p99_ms"],
                             "x_p50": r["ratio"]["p50_ms"], "x_p99": r["ratio"]["p99_ms"],
                             "victim_503": r["flooded"]["statuses"].get("503", 0),
                             "flood_tok_s": r["flood_tokens_per_s"]})
        if only & {"stalled", "tpm", "budget"}:
            with ProcessServer(Path(tmp) / "limits", model="demo", max_queue=4,
                               max_running=8) as server:
                if "stalled" in only:
                    f = server.admin.tenant("stall")
                    v = server.admin.tenant("victim")
                    r = asyncio.run(stalled(server.url, server.port, f.key, v.headers,
                                            args.alone, args.duration / 2))
                    result["stalled"] = r
                    rows.append({"scenario": "12 stalled readers",
                                 "alone_p50": r["alone"]["p50_ms"],
                                 "alone_p99": r["alone"]["p99_ms"],
                                 "loaded_p50": r["with_stalled_readers"]["p50_ms"],
                                 "loaded_p99": r["with_stalled_readers"]["p99_ms"],
                                 "x_p50": r["ratio"]["p50_ms"], "x_p99": r["ratio"]["p99_ms"],
                                 "victim_503": r["victim_503"]})
                if "tpm" in only:
                    t = server.admin.tenant("tpm", tokens_per_minute=TPM_LIMIT)
                    result["tpm"] = asyncio.run(tpm(server.url, t.headers, TPM_LIMIT))
                if "budget" in only:
                    b = server.admin.tenant("budget", budget_daily_micros=1000)
                    result["budget"] = asyncio.run(budget(server.url, b.headers, server.admin,
                                                          b.id, 1000))
    print_table(rows, "victim TTFT (ms): alone vs loaded")
    if "tpm" in result:
        print(f"  tpm: {result['tpm']}")
    if "budget" in result:
        print(f"  budget: {result['budget']}")
    write_result("fairness", result)


if __name__ == "__main__":
    main()
