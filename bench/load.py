"""Load against a running kvgate: throughput, TTFT of hits and misses, the gateway's overhead.

Traffic is a mix users produce: several tenants, each with a long shared system prompt
(later requests hit it), multi-turn conversations (each turn hits the previous ones),
one-off prompts (misses), over chat, completions and messages, streamed and not. Bounded
by ``--requests`` and ``--duration``; loopback only.

- TTFT is measured on streamed requests: the server sends its headers with the first
  token, so time-to-headers is time-to-first-token. A hit is a response whose usage says
  ``cached_tokens > 0``.
- Overhead is what the gateway adds on top of the engine: client-observed time minus the
  ``engine;dur`` of the ``server-timing`` header. For non-streamed requests that is the
  whole response; for streamed ones, time to headers minus the engine's time to first
  token (reported separately).

Goal: overhead p50 ≤ 1 ms and p99 ≤ 5 ms at 64 concurrent clients.

Run: ``python -m bench.load`` (starts its own server on a temporary SQLite ledger), or
``python -m bench.load --url http://127.0.0.1:8000`` with ``KVGATE_ADMIN_KEY`` set.
``--profile`` runs the server it starts under cProfile and prints the event loop's top
functions. Writes ``bench/results/load.json`` (``--model smollm2``, the real model:
``load-smollm2.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np

from bench.common import RESULTS, print_table, smoke, write_result
from bench.load_server import experiment_prelude, ledger_commit_ms, print_profile
from kvgate.gateway.loop import LOOPS
from testkit import Admin, ProcessServer, aiter_sse, billed_usage, final_usage, request_body

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KINDS = ("chat", "completions", "messages")
WORDS = ("cache", "tenant", "ledger", "token", "prefix", "block", "page", "engine", "model",
         "stream", "bill", "quota", "evict", "promote", "hash", "batch", "prompt", "reply")


@dataclass
class Sample:
    kind: str
    stream: bool
    scenario: str
    status: int
    total_s: float = 0.0
    ttft_s: float | None = None
    engine_s: float | None = None
    server_s: float | None = None  # server-timing total: request in → headers out
    ledger_s: float | None = None  # server-timing ledger: the usage commit (not on streams)
    prompt_tokens: int = 0
    cached_tokens: int = 0


# -- traffic ---------------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def timing(headers: Any, name: str) -> float | None:
    m = re.search(name + r";dur=([0-9.]+)", headers.get("server-timing", ""))
    return float(m.group(1)) / 1000.0 if m else None


async def one(session: aiohttp.ClientSession, url: str, key: str, path: str, body: dict,
              kind: str, scenario: str) -> tuple[Sample, str]:
    stream = bool(body.get("stream"))
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    async with session.post(url + path, json=body, headers=headers) as resp:
        t_headers = time.perf_counter() - t0
        sample = Sample(kind, stream, scenario, resp.status,
                        engine_s=timing(resp.headers, "engine"),
                        server_s=timing(resp.headers, "total"),
                        ledger_s=timing(resp.headers, "ledger"))
        if resp.status != 200:
            await resp.read()
            sample.total_s = time.perf_counter() - t0
            return sample, ""
        text = ""
        if not stream:
            data = await resp.json()
            usage = data["usage"]
            if kind == "chat":
                text = data["choices"][0]["message"]["content"]
            elif kind == "completions":
                text = data["choices"][0]["text"]
            else:
                text = "".join(b.get("text", "") for b in data["content"])
        else:
            sample.ttft_s = t_headers
            usage = {}
            async for ev in aiter_sse(resp):
                if not ev.done and (final := final_usage(ev.payload)) is not None:
                    usage = dict(final)
        sample.total_s = time.perf_counter() - t0
        billed = billed_usage(kind, usage)
        sample.prompt_tokens, sample.cached_tokens = billed["prompt_tokens"], billed["cached_tokens"]
        return sample, text


async def client(i: int, session: aiohttp.ClientSession, url: str, tenants: list[dict],
                 args: argparse.Namespace, budget: list[int], deadline: float,
                 samples: list[Sample]) -> None:
    rng = random.Random(args.seed * 1000 + i)
    tenant = tenants[i % len(tenants)]
    turns: list[tuple[str, str]] = []
    while budget[0] > 0 and time.monotonic() < deadline:
        budget[0] -= 1
        scenario = rng.choice(("shared", "conversation", "conversation", "one-off"))
        kind = rng.choice(KINDS)
        stream = rng.random() < 0.5
        history: list[tuple[str, str]] = []
        if scenario == "one-off":
            system = f"{rng.random():.12f} " + words(rng, 60)
            question = words(rng, 8)
        elif scenario == "shared":
            system = tenant["system"]
            question = words(rng, 8)
        else:
            system = tenant["system"]
            if len(turns) >= 4:
                turns = []
            history, question = turns, f"client {i}: " + words(rng, 8)
        path, body = request_body(f"{kind}-stream" if stream else kind, question,
                                  args.max_tokens, system=system, history=history,
                                  model=args.model)
        try:
            sample, reply = await one(session, url, tenant["key"], path, body, kind, scenario)
        except (TimeoutError, aiohttp.ClientError) as exc:
            samples.append(Sample(kind, stream, scenario, 0))
            print(f"client {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        samples.append(sample)
        if scenario == "conversation" and sample.status == 200:
            turns = [*history, (question, reply or "ok")]


def setup_tenants(admin: Admin, n: int, rng: random.Random) -> list[dict]:
    out = []
    for t in range(n):
        tenant = admin.tenant("load")
        system = f"You are assistant number {t} of tenant {tenant.name}. " + words(rng, 90)
        out.append({"id": tenant.id, "key": tenant.key, "system": system})
    return out


async def probe_unloaded(session: aiohttp.ClientSession, url: str, tenant: dict,
                         args: argparse.Namespace) -> dict[str, Any]:
    """After the load: one client, each fresh prompt sent twice (miss, then hit), so the
    cache's own effect on TTFT and the overhead without contention are on record too."""
    rng = random.Random(args.seed + 99)
    ttft: dict[str, list[float]] = {"hit": [], "miss": []}
    overhead: list[float] = []
    for n in range(args.probes):
        stream = n % 2 == 0
        text = f"{rng.random():.12f} " + words(rng, 120)
        for label in ("miss", "hit"):
            path, body = request_body("chat-stream" if stream else "chat", "probe",
                                      args.max_tokens, system=text, model=args.model)
            sample, _ = await one(session, url, tenant["key"], path, body, "chat", "probe")
            if sample.status != 200:
                continue
            if stream and sample.ttft_s is not None:
                if (sample.cached_tokens > 0) == (label == "hit"):
                    ttft[label].append(sample.ttft_s)
            elif not stream and sample.engine_s is not None:
                overhead.append(sample.total_s - sample.engine_s)
    return {"ttft_hit_unloaded_p50_ms": pct(ttft["hit"], 50),
            "ttft_miss_unloaded_p50_ms": pct(ttft["miss"], 50),
            "overhead_unloaded_p50_ms": pct(overhead, 50),
            "overhead_unloaded_p99_ms": pct(overhead, 99)}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000.0, 3) if values else None


NOTES = (
    "Where the overhead goes on a 2-core machine that also runs the engine's torch threads "
    "and the 64-client generator: ledger_wait is the usage commit the response waits for "
    "(group commit on the SQLite writer thread; 0.26 ms alone, 2-4 ms under load because "
    "the writer thread waits for a CPU and the GIL); the rest is the event loop serving, "
    "one after another, the requests an engine step finished together. Measured and "
    "changed: one thread hop per ledger batch instead of one per statement through "
    "aiosqlite (p50 20.5 ms before, 10-13 ms over five runs after); non-streamed requests get their tokens in one event. "
    "Measured and not kept: synchronous=NORMAL (17.5 ms), a 0.5 ms GIL switch interval "
    "(16.8 ms, p99 worse), one torch thread (14.6 ms, throughput -30%), the engine in a "
    "process of its own over a socket pair (11.8 ms vs 9.9 ms in-process: no gain while "
    "the engine, the server and the clients share two cores)."
)


def summarize(samples: list[Sample], wall_s: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    ttft_hit = [s.ttft_s for s in ok if s.stream and s.cached_tokens > 0 and s.ttft_s]
    ttft_miss = [s.ttft_s for s in ok if s.stream and s.cached_tokens == 0 and s.ttft_s]
    overhead = [s.total_s - s.engine_s for s in ok if not s.stream and s.engine_s is not None]
    overhead_stream = [s.ttft_s - s.engine_s for s in ok
                       if s.stream and s.engine_s is not None and s.ttft_s is not None]
    plain = [s for s in ok if not s.stream and s.engine_s is not None and s.server_s is not None]
    inside = [s.server_s - s.engine_s for s in plain]  # type: ignore[operator]
    outside = [s.total_s - s.server_s for s in plain]  # type: ignore[operator]
    ledger = [s.ledger_s for s in plain if s.ledger_s is not None]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    prompt = sum(s.prompt_tokens for s in ok)
    return {
        "requests_per_s": round(len(ok) / wall_s, 3),
        "ttft_hit_p50_ms": pct(ttft_hit, 50),
        "ttft_miss_p50_ms": pct(ttft_miss, 50),
        "overhead_p50_ms": pct(overhead, 50),
        "overhead_p99_ms": pct(overhead, 99),
        "ttft_hit_p99_ms": pct(ttft_hit, 99),
        "ttft_miss_p99_ms": pct(ttft_miss, 99),
        "overhead_stream_p50_ms": pct(overhead_stream, 50),
        "overhead_stream_p99_ms": pct(overhead_stream, 99),
        # where the non-streamed overhead is spent: inside the server (after the engine's
        # finish until the headers go out) and outside it (socket, event-loop wake-ups)
        "overhead_in_server_p50_ms": pct(inside, 50),
        "overhead_in_server_p99_ms": pct(inside, 99),
        "overhead_outside_server_p50_ms": pct(outside, 50),
        "overhead_outside_server_p99_ms": pct(outside, 99),
        # of the in-server part: the usage commit the response waits for
        "ledger_wait_p50_ms": pct(ledger, 50),
        "ledger_wait_p99_ms": pct(ledger, 99),
        "latency_p50_ms": pct([s.total_s for s in ok], 50),
        "latency_p99_ms": pct([s.total_s for s in ok], 99),
        "clients": args.clients,
        "requests": len(samples),
        "ok": len(ok),
        "statuses": statuses,
        "wall_s": round(wall_s, 3),
        "max_tokens": args.max_tokens,
        "hit_token_ratio": round(sum(s.cached_tokens for s in ok) / prompt, 4) if prompt else 0,
        "samples": {"ttft_hit": len(ttft_hit), "ttft_miss": len(ttft_miss),
                    "overhead": len(overhead), "overhead_stream": len(overhead_stream)},
        "goal": {"overhead_p50_ms": 1.0, "overhead_p99_ms": 5.0},
    }


async def main(args: argparse.Namespace) -> int:
    own: ProcessServer | None = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host not in LOOPBACK:
            raise SystemExit(f"--url must be a loopback address (got {host!r})")
        admin_key = args.admin_key or os.environ.get("KVGATE_ADMIN_KEY", "")
        if not admin_key:
            raise SystemExit("set KVGATE_ADMIN_KEY (or --admin-key) to create tenants")
        admin = Admin(args.url.rstrip("/"), admin_key)
    else:
        own = ProcessServer(profile=args.profile, prelude=experiment_prelude(args),
                            device_cache_bytes=args.device_cache_bytes,
                            host_cache_bytes=args.host_cache_bytes, max_queue=1024,
                            api_servers=args.api_servers, model=args.model,
                            event_loop=args.event_loop)
    try:
        if own is not None:
            await asyncio.to_thread(own.start)
            admin = own.admin
        url = admin.url
        rng = random.Random(args.seed)
        tenants = setup_tenants(admin, args.tenants, rng)
        timeout = aiohttp.ClientTimeout(total=args.duration + 60)
        connector = aiohttp.TCPConnector(limit=args.clients)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            samples: list[Sample] = []
            budget = [args.requests]
            t0 = time.monotonic()
            await asyncio.gather(*(client(i, session, url, tenants, args, budget,
                                          t0 + args.duration, samples)
                                   for i in range(args.clients)))
            wall = time.monotonic() - t0
            ledger_ms = await ledger_commit_ms(
                session, url, admin.http.headers["Authorization"].removeprefix("Bearer "))
            unloaded = await probe_unloaded(session, url, tenants[0], args) if args.probes \
                else {}
        if own is not None:
            own.stop()  # before the report: the profile is written as the server exits
        report(args, samples, wall, ledger_ms, unloaded, own)
    finally:
        if own is not None:
            own.close()
    return 0


def write_load(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The demo's figures to ``load.json``; another model's beside them, one run per client
    count, in ``load-<model>.json``."""
    if args.model == "demo":
        write_result("load", result)
        return
    name = f"load-{args.model}"
    try:
        runs = json.loads((RESULTS / f"{name}.json").read_text()).get("runs", {})
    except (OSError, ValueError):
        runs = {}
    runs[f"clients={args.clients}"] = result
    write_result(name, {"model": args.model, "runs": runs})


def report(args: argparse.Namespace, samples: list[Sample], wall: float,
           ledger_ms: float | None, unloaded: dict[str, Any], own: ProcessServer | None) -> None:
    result = summarize(samples, wall, args)
    result["ledger_commit_mean_ms"] = ledger_ms
    result.update(unloaded)
    result["experiment"] = experiment_prelude(args) if own is not None else ""
    rows = [{"metric": k, "value": v} for k, v in result.items()
            if not isinstance(v, dict) and k != "experiment"]
    print_table(rows, f"kvgate load: {args.clients} clients, {len(samples)} requests")
    print(f"  statuses: {result['statuses']}")
    if result["experiment"]:
        print(f"  experiment (server prelude): {result['experiment']}")
    met = ((result["overhead_p50_ms"] or 1e9) <= 1.0 and (result["overhead_p99_ms"] or 1e9) <= 5.0)
    print(f"  overhead goal (p50 <= 1 ms, p99 <= 5 ms): {'met' if met else 'MISSED'}")
    result["goal"]["met"] = met
    result["notes"] = NOTES
    result["api_servers"] = args.api_servers
    result["model"] = args.model
    result["event_loop"] = args.event_loop
    args.result = result
    if not args.no_write:
        write_load(args, result)
    if own is not None and own.profile_path is not None:
        print_profile(own.profile_path, args.profile_top)
        if args.profile_out and own.profile_path.exists():
            Path(args.profile_out).write_bytes(own.profile_path.read_bytes())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running kvgate on loopback (default: start one)")
    p.add_argument("--admin-key", help="admin key for --url (default: $KVGATE_ADMIN_KEY)")
    p.add_argument("--clients", type=int, default=smoke(64, 4))
    p.add_argument("--requests", type=int, default=smoke(640, 16), help="total requests (bound)")
    p.add_argument("--duration", type=float, default=smoke(120.0, 15.0), help="seconds (bound)")
    p.add_argument("--tenants", type=int, default=smoke(4, 2))
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probes", type=int, default=smoke(16, 2),
                   help="fresh prompts sent twice by one client after the load (0: skip)")
    p.add_argument("--device-cache-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--host-cache-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--profile", action="store_true",
                   help="run the server this script starts under cProfile")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-out", help="keep the server's cProfile stats in this file")
    p.add_argument("--switch-interval", type=float, default=0.0,
                   help="experiment: the server it starts runs sys.setswitchinterval(S)")
    p.add_argument("--sqlite-synchronous", choices=("NORMAL", "FULL", "OFF"),
                   help="experiment: the server it starts sets this SQLite synchronous mode")
    p.add_argument("--api-servers", type=int, default=None,
                   help="the server it starts: --api-servers (default: its own default; "
                        "0: engine and HTTP in one process)")
    p.add_argument("--model", default="demo",
                   help="the server it starts: --model (demo; smollm2: the real model, "
                        "written to bench/results/load-smollm2.json); with --url, the "
                        "model the requests name")
    p.add_argument("--event-loop", default="uvloop", choices=LOOPS,
                   help="the server it starts: --event-loop (uvloop)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
