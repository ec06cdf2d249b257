"""Work before admission: a rate-limited tenant floods big prompts; does anyone else notice?

A ``kvgate serve`` child (SQLite ledger in a temporary directory, default body limit of
4 MiB) gets two tenants: ``flood``, limited to 30 requests per minute, and ``victim``,
unlimited. First, unloaded: ``/healthz`` and the victim's small chat request, each sampled
alone. Then, loaded: ``--clients`` clients send chat requests whose prompt is ``--prompt-mb``
megabytes of text, back to back and ignoring ``Retry-After``, while ``/healthz`` and the
victim are sampled as before.

Reported: p50 / p99 / max latency of both, unloaded and loaded, and loaded ÷ unloaded
(1.0 = the flood goes unnoticed); the flood's statuses (429 = turned away at admission).
Before admission came first, the server rendered and tokenized every prompt on its event
loop: nothing else ran meanwhile, and no flood request was ever a 429.

Run: ``python -m bench.admission [--duration 20] [--clients 4] [--prompt-mb 3.9]
[--label after]``. Writes ``bench/results/admission.json`` (runs kept by label, so a
before/after pair lives in one file).
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

from bench.common import RESULTS, print_table, smoke, write_result
from testkit import ProcessServer, request_body

FLOOD_RPM = 30


def _stats(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.array(samples) * 1000.0
    return {"n": len(samples), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


async def _timed(session: aiohttp.ClientSession, method: str, url: str,
                 **kw: Any) -> tuple[int, float]:
    t0 = time.perf_counter()
    async with session.request(method, url, **kw) as r:
        await r.read()
        return r.status, time.perf_counter() - t0


async def _sample(session: aiohttp.ClientSession, url: str, victim: dict[str, str],
                  until: float, health: list[float], answers: list[float],
                  statuses: Counter[int]) -> None:
    """``/healthz`` every 50 ms and the victim's request back to back, until ``until``."""
    path, body = request_body("chat", "How are you?", 2)

    async def healthz() -> None:
        while time.perf_counter() < until:
            status, dt = await _timed(session, "GET", url + "/healthz")
            assert status == 200
            health.append(dt)
            await asyncio.sleep(0.05)

    async def victim_loop() -> None:
        while time.perf_counter() < until:
            status, dt = await _timed(session, "POST", url + path, json=body, headers=victim)
            statuses[status] += 1
            if status == 200:
                answers.append(dt)
            await asyncio.sleep(0.05)

    await asyncio.gather(healthz(), victim_loop())


async def _flood(url: str, headers: dict[str, str], payload: bytes, until: float,
                 statuses: Counter[int]) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.perf_counter() < until:
            try:
                async with session.post(url + "/v1/chat/completions", data=payload,
                                        headers={**headers,
                                                 "Content-Type": "application/json"}) as r:
                    await r.read()
                    statuses[r.status] += 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                statuses[-1] += 1  # the server closed the connection on an unread body
                del exc
                await asyncio.sleep(0.01)


async def measure(url: str, flood: dict[str, str], victim: dict[str, str], duration: float,
                  clients: int, prompt_mb: float) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(3):  # warm up: connections, the model's first step
            await _timed(session, "GET", url + "/healthz")
            path, body = request_body("chat", "warm", 2)
            await _timed(session, "POST", url + path, json=body, headers=victim)
        idle_health: list[float] = []
        idle_answers: list[float] = []
        idle_status: Counter[int] = Counter()
        await _sample(session, url, victim, time.perf_counter() + min(duration, 10.0),
                      idle_health, idle_answers, idle_status)

        text = "cache tenant ledger " * int(prompt_mb * 1e6 / 20)
        payload = json.dumps({"model": "demo", "max_tokens": 2,
                              "messages": [{"role": "user", "content": text}]}).encode()
        flood_status: Counter[int] = Counter()
        busy_health: list[float] = []
        busy_answers: list[float] = []
        busy_status: Counter[int] = Counter()
        until = time.perf_counter() + duration
        await asyncio.gather(
            *(_flood(url, flood, payload, until, flood_status) for _ in range(clients)),
            _sample(session, url, victim, until, busy_health, busy_answers, busy_status))
    unloaded = {"healthz": _stats(idle_health), "victim": _stats(idle_answers)}
    loaded = {"healthz": _stats(busy_health), "victim": _stats(busy_answers)}
    ratio = {what: {q: round(loaded[what][q] / unloaded[what][q], 2)
                    if unloaded[what][q] else None for q in ("p50_ms", "p99_ms", "max_ms")}
             for what in ("healthz", "victim")}
    return {"unloaded": unloaded, "loaded": loaded, "loaded_over_unloaded": ratio,
            "flood_statuses": {str(k): v for k, v in sorted(flood_status.items())},
            "victim_statuses_loaded": {str(k): v for k, v in sorted(busy_status.items())},
            "payload_bytes": len(payload)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=smoke(20.0, 2.0),
                    help="loaded phase, seconds")
    ap.add_argument("--clients", type=int, default=smoke(4, 2), help="flood clients")
    ap.add_argument("--prompt-mb", type=float, default=smoke(3.9, 0.5),
                    help="flood prompt size, MB")
    ap.add_argument("--label", default="after", help="the run's name in the results file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvgate-admission-") as tmp, \
            ProcessServer(Path(tmp), device_cache_bytes=64 * 1024 * 1024,
                          max_body_bytes=4 * 1024 * 1024) as server:
        flood = server.admin.tenant("flood", requests_per_minute=FLOOD_RPM)
        victim = server.admin.tenant("victim")
        result = asyncio.run(measure(server.url, flood.headers, victim.headers, args.duration,
                                     args.clients, args.prompt_mb))
    result["config"] = {"duration_s": args.duration, "clients": args.clients,
                        "prompt_mb": args.prompt_mb, "flood_requests_per_minute": FLOOD_RPM}

    rows = []
    for what in ("healthz", "victim"):
        for phase in ("unloaded", "loaded"):
            rows.append({"what": what, "phase": phase, **result[phase][what]})
        rows.append({"what": what, "phase": "loaded/unloaded", "n": None,
                     **result["loaded_over_unloaded"][what]})
    print_table(rows, f"admission ({args.label}): latency under a flood of "
                      f"{args.prompt_mb:g} MB prompts from {args.clients} clients of a "
                      f"{FLOOD_RPM} rpm tenant")
    print(f"  flood statuses: {result['flood_statuses']}; victim statuses while loaded: "
          f"{result['victim_statuses_loaded']}")

    runs: dict[str, Any] = {}
    previous = RESULTS / "admission.json"
    if previous.exists():
        try:
            runs = dict(json.loads(previous.read_text()).get("runs", {}))
        except (ValueError, AttributeError):
            runs = {}
    runs[args.label] = result
    write_result("admission", {"runs": runs})


if __name__ == "__main__":
    main()
