"""Scale-out on one machine: three ``kvgate serve`` replicas, two ``kvgate route`` routers,
a real redis-server (cache events, shared tier) and PostgreSQL (the shared ledger).

Replays a multi-tenant conversation workload shaped after the Mooncake conversation trace
(input and output lengths sampled from it, scaled down for the demo model on CPU): every
tenant has its own system prompt, each conversation grows turn by turn (the previous
prompt, the answer, a new user message), with think-time gaps between turns (compressed).

Scenarios (fresh tenants each, caches flushed between):
  single-3x      one replica with three times the pages (the ceiling for hit ratio)
  round-robin    three replicas, requests spread in turn (a Kubernetes Service; baseline)
  routed         three replicas behind two routers with cache events
  routed+shared  the same with the shared Valkey/Redis tier (--shared-tier-url)
  kill-restart   routed; one replica SIGKILLed mid-run and restarted; once it is back, a
                 second wave of the same tenants' conversations: the restarted replica's
                 hit ratio over that wave vs. its ratio before the kill (the scenario's
                 own columns are the first wave; the per-replica counts include both)
  kill-restart+shared  the same with the shared tier (a restarted replica warms from it)

Reports the cache-hit token ratio, TTFT p50/p99, requests and prompt tokens per replica,
and the router's own latency (a direct request vs. one through a router). Writes
bench/results/cluster.json.

    .venv/bin/python -m bench.cluster --trace mooncake-conversation.jsonl  # reported (seed 2)
    .venv/bin/python -m bench.cluster --trace ... --seed 1  # the set constants were tuned on
    .venv/bin/python -m bench.cluster --sweep     # single-3x, round-robin and routed over
        # seeds x tenant counts x cache fractions none of the constants were set on
    .venv/bin/python -m bench.cluster --sweep --sweep-seeds 3 --sweep-tenants 12 \
        --sweep-fractions 0.3 --sweep-rerun  # one configuration again, kept beside the sweep
    .venv/bin/python -m bench.cluster --overhead  # the router's hop alone, with its parts
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.common import print_table, smoke, write_result
from kvgate.gateway.config import Settings, names
from kvgate.gateway.loop import LOOPS
from kvgate.gateway.route.choose import HALF_LIFE, LOAD_SLACK
from testkit import Admin, ProcessServer
from testkit.admin import ADMIN_KEY, EVENTS_SECRET
from testkit.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("KVGATE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
PAGE_BYTES = 4 * 2 * 16 * 2 * 64 * 4  # the demo model's KV page (float32, 16 tokens)
SCALE = 16  # trace token counts / SCALE: prompts the demo model prefills quickly on a CPU
MAX_TOKENS = 4  # answers kept short: decoding on a CPU is what would dominate otherwise
CHAT = "/v1/chat/completions"
START_SPREAD_S = smoke(8.0, 1.0)  # conversations start at random in this window
THINK_MEAN_S = smoke(0.6, 0.1)  # mean gap between a conversation's turns (exponential)
RESTART_AFTER_S = smoke(2.0, 0.5)  # kill-restart: a killed replica is started again after
ROUTER_OVERHEAD_N = smoke(60, 3)  # requests timed each way (direct, routed) per endpoint
# Replicas and routers of the scale-out scenarios (each a process that takes seconds to start).
REPLICAS, ROUTERS = smoke(3, 2), smoke(2, 1)


# -- the workload ------------------------------------------------------------------------

@dataclass
class Conversation:
    tenant: int
    system: str
    turns: list[str]  # user messages
    start_s: float
    think_s: list[float]


def _lengths(trace: Path, seed: int) -> tuple[list[int], list[int]]:
    rows = []
    with trace.open() as f:
        for i, line in enumerate(f):
            if i >= 4000:
                break
            rows.append(json.loads(line))
    rng = random.Random(seed)
    rng.shuffle(rows)
    return [r["input_length"] for r in rows], [r["output_length"] for r in rows]


def _text(rng: random.Random, n: int) -> str:
    words = ["cache", "prefix", "tenant", "replica", "route", "token", "block", "page",
             "valkey", "ledger", "stream", "shard", "model", "query", "answer", "turn"]
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def workload(trace: Path, seed: int, tenants: int, convs: int,
             turns: int) -> list[Conversation]:
    inputs, _outputs = _lengths(trace, seed)
    rng = random.Random(seed)
    it = iter(inputs * 4)
    out = []
    for t in range(tenants):
        system = f"[tenant {t} system prompt] " + _text(rng, max(160, next(it) // SCALE))
        for c in range(convs):
            users = [f"[conversation {c}] " + _text(rng, max(24, next(it) // (SCALE * 6)))
                     for _ in range(turns)]
            out.append(Conversation(t, system, users, start_s=rng.uniform(0, START_SPREAD_S),
                                    think_s=[rng.expovariate(1 / THINK_MEAN_S)
                                             for _ in range(turns)]))
    return out


def working_set_pages(convs: list[Conversation]) -> int:
    """Pages the whole workload's prefixes take (system prompts shared per tenant)."""
    systems = {c.tenant: len(c.system) for c in convs}
    pages = sum(s // 16 for s in systems.values())
    for c in convs:
        pages += (sum(len(u) for u in c.turns) + len(c.turns) * (MAX_TOKENS + 12)) // 16
    return pages


# -- processes -----------------------------------------------------------------------------

class RouterProcess:
    def __init__(self, workdir: Path, db: str, replicas: list[str], events_url: str,
                 log_level: str = "warning", event_loop: str = "uvloop") -> None:
        self.port = free_port()
        self.event_loop = event_loop
        self.log_path = workdir / f"router-{self.port}.log"
        cmd = [sys.executable, "-m", "kvgate.gateway.cli", "route", "--port", str(self.port), "--model", "demo",
               "--db", db, "--events-url", events_url, "--log-level", log_level,
               "--event-loop", event_loop]
        for r in replicas:
            cmd += ["--replica", r]
        env = {**os.environ, "KVGATE_ADMIN_KEY": ADMIN_KEY, "KVGATE_EVENTS_SECRET": EVENTS_SECRET,
               "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, session: aiohttp.ClientSession, replicas: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("kvgate route exited:\n" + self.log_path.read_text())
            try:
                async with session.get(self.url + "/readyz") as r:
                    if r.status == 200 and len((await r.json())["replicas"]) == replicas:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("kvgate route not ready:\n" + self.log_path.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # a router holds no state worth waiting for
                self.proc.kill()
                self.proc.wait(10)


async def fresh_database() -> tuple[str, str]:
    name = f"kvgate_cluster_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_URL.rpartition("/")[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def replica_settings(workdir: Path, name: str, db: str, pages: int, events_url: str,
                     shared_url: str = "") -> Settings:
    values: dict[str, Any] = dict(
        host="127.0.0.1", port=free_port(), model="demo", db=db, admin_key=ADMIN_KEY,
        device_cache_bytes=pages * PAGE_BYTES, host_cache_bytes=PAGE_BYTES,
        spool_dir=str(workdir / f"spool-{name}"), events_url=events_url,
        events_secret=EVENTS_SECRET,
        log_level="warning", default_cache_ttl_seconds=3600)
    if shared_url:
        values["shared_tier_url"] = shared_url
    return Settings.from_env({}, **values)


# -- one scenario ----------------------------------------------------------------------------

@dataclass
class Outcome:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    answered: int = 0
    failed: int = 0


async def _stream(session: aiohttp.ClientSession, url: str, key: str,
                  messages: list[dict[str, str]], out: Outcome) -> str | None:
    body = {"model": "demo", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": messages}
    t0 = time.monotonic()
    text, usage, first = [], None, None
    try:
        async with session.post(url + CHAT, json=body,
                                headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status != 200:
                out.failed += 1
                return None
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    out.failed += 1
                    return None
                if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                    first = first or time.monotonic()
                    text.append(ev["choices"][0]["delta"]["content"])
                if ev.get("usage"):
                    usage = ev["usage"]
    except (TimeoutError, aiohttp.ClientError):
        out.failed += 1
        return None
    if usage is None:
        out.failed += 1
        return None
    out.answered += 1
    out.prompt_tokens += usage["prompt_tokens"]
    out.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
    out.ttft_s.append((first or time.monotonic()) - t0)
    return "".join(text)


async def replay(session: aiohttp.ClientSession, convs: list[Conversation], keys: list[str],
                 pick: Any) -> Outcome:
    out = Outcome()
    counter = iter(range(10**9))

    async def one(c: Conversation) -> None:
        await asyncio.sleep(c.start_s)
        messages = [{"role": "system", "content": c.system}]
        for user, think in zip(c.turns, c.think_s, strict=True):
            messages.append({"role": "user", "content": user})
            answer = await _stream(session, pick(next(counter), c), keys[c.tenant], messages,
                                   out)
            messages.append({"role": "assistant", "content": answer or ""})
            await asyncio.sleep(think)

    await asyncio.gather(*(one(c) for c in convs))
    return out


async def replica_counts(session: aiohttp.ClientSession, urls: list[str]) -> list[dict[str, int]]:
    """Per replica: chat requests answered 200 and prompt tokens seen (hit + miss)."""
    rows = []
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for url in urls:
        try:
            async with session.get(url + "/metrics", headers=auth) as r:
                text = await r.text()
            async with session.get(url + "/admin/cache/stats", headers=auth) as r:
                stats = await r.json()
        except aiohttp.ClientError:
            rows.append({"requests": 0, "tokens": 0})
            continue
        n = sum(float(m.group(1)) for m in re.finditer(
            r'kvgate_requests_total\{[^}]*endpoint="/v1/chat/completions"[^}]*status="200"'
            r'[^}]*\} ([0-9.e+]+)', text))
        rows.append({"requests": int(n), "tokens": stats["hit_tokens"] + stats["miss_tokens"]})
    return rows


async def cache_tokens(session: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """A replica's prompt tokens served from its cache and computed, since it started."""
    async with session.get(url + "/admin/cache/stats",
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
        stats = await r.json()
    return int(stats["hit_tokens"]), int(stats["miss_tokens"])


def _ratio(tokens: tuple[int, int]) -> float | None:
    return round(tokens[0] / sum(tokens), 4) if sum(tokens) else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000.0


def row_of(name: str, out: Outcome, before: list[dict[str, int]],
           after: list[dict[str, int]], note: str = "") -> dict[str, Any]:
    reqs = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
    toks = [a["tokens"] - b["tokens"] for a, b in zip(after, before, strict=True)]
    live = [r for r in reqs if r > 0] or [0]
    return {"scenario": name, "answered": out.answered, "failed": out.failed,
            "hit_ratio": round(out.cached_tokens / out.prompt_tokens, 4)
            if out.prompt_tokens else None,
            "ttft_p50_ms": _pct(out.ttft_s, 0.5), "ttft_p99_ms": _pct(out.ttft_s, 0.99),
            "requests_per_replica": reqs, "prompt_tokens_per_replica": toks,
            "max_min_load": round(max(live) / min(live), 3) if min(live) else None,
            "note": note}


async def router_overhead(session: aiohttp.ClientSession, direct: str,
                          routers: list[RouterProcess], key: str,
                          n: int = ROUTER_OVERHEAD_N) -> dict[str, Any]:
    """One request at a time, in turn direct and through each router (one per event loop,
    the default's first) to the same replica: ``GET /v1/models`` (auth and the proxy
    alone), ``POST /tokenize`` (a body too, not rendered: the replica answers it at once)
    and a one-token chat completion (also rendering, tokenizing and hashing the prompt; the
    engine's step dominates it, and the router's process wakes on a core the replica's model
    left cold). The figures without a loop's name are the default's; ``added_<loop>`` are
    the others', from the same run."""
    chat = {"model": "demo", "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": "ping"}]}
    auth = {"Authorization": f"Bearer {key}"}
    out: dict[str, Any] = {}
    tokenize = {"model": "demo", "prompt": "ping"}
    for label, method, path, body in (("models", "GET", "/v1/models", None),
                                      ("tokenize", "POST", "/tokenize", tokenize),
                                      ("chat", "POST", CHAT, chat)):
        urls = {"direct": direct, **{rt.event_loop: rt.url for rt in routers}}
        times: dict[str, list[float]] = {which: [] for which in urls}
        own: dict[str, list[float]] = {}
        turns = list(urls)
        for i in range(len(turns) * (n + 5)):
            which = turns[i % len(turns)]
            t0 = time.perf_counter()
            async with session.request(method, urls[which] + path, json=body,
                                       headers=auth) as r:
                await r.read()
                timing = r.headers.get("server-timing", "")
            if i >= len(turns) * 5:  # warm-up left out
                times[which].append(time.perf_counter() - t0)
                if which != turns[1]:
                    continue
                for m in re.finditer(r"(router(?:-[a-z]+)?);dur=([0-9.]+)", timing):
                    own.setdefault(m.group(1), []).append(float(m.group(2)))
        p50 = {k: statistics.median(v) * 1000.0 for k, v in times.items()}
        out[label] = {"direct_p50_ms": round(p50["direct"], 3),
                      "routed_p50_ms": round(p50[turns[1]], 3),
                      "added_p50_ms": round(p50[turns[1]] - p50["direct"], 3),
                      **{f"added_{name}_p50_ms": round(p50[name] - p50["direct"], 3)
                         for name in turns[2:]},
                      "router_before_forward_p50_ms":
                          round(statistics.median(own["router"]), 3) if own else None,
                      **{f"{name.replace('-', '_')}_p50_ms": round(statistics.median(v), 3)
                         for name, v in own.items() if name != "router"}}
    out["chat"]["render_in_process"] = render_after_idle(chat)
    return out


def render_after_idle(body: dict[str, Any], n: int = 200) -> dict[str, float]:
    """The router's own render + tokenize + hash of ``body`` (``PromptRenderer.hashes``),
    in this process, µs median: back to back, and after idling 1 ms and 20 ms (about the
    replica's one-token chat step) before each. The same code, the same body: what the
    idle gap alone costs. One request at a time, a router sleeps while the replica
    computes, and on this machine a process that slept wakes to a slower CPU (caches
    cold, the core clocked down or given to another guest), which ``server-timing``'s
    ``router-render`` shows as several times this warm figure."""
    from kvgate.gateway.route.prompt import PromptRenderer, tokenizer_for
    renderer = PromptRenderer(tokenizer_for(body["model"]))
    raw = json.dumps(body).encode()
    out: dict[str, float] = {}
    for label, gap in (("warm_us", 0.0), ("after_1ms_idle_us", 0.001),
                       ("after_20ms_idle_us", 0.02)):
        times = []
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            renderer.hashes(CHAT, raw, 1, body["model"], 16)
            times.append(time.perf_counter() - t0)
        out[label] = round(statistics.median(times) * 1e6, 1)
    return out


async def billing_check(db_name: str, tenant_ids: list[int]) -> dict[str, int]:
    conn = await asyncpg.connect(PG_URL.rpartition("/")[0] + "/" + db_name, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT request_id, status FROM usage_events WHERE tenant_id = ANY($1::int[])",
            tenant_ids)
    finally:
        await conn.close()
    ids = [r["request_id"] for r in rows]
    return {"rows": len(rows), "distinct_request_ids": len(set(ids)),
            "ok_rows": sum(1 for r in rows if r["status"] in ("ok", "completed", "stop"))}


# -- the run -----------------------------------------------------------------------------------

@dataclass
class Fleet:
    workdir: Path
    db: str
    events_url: str
    pages: int
    replicas: list[ProcessServer] = field(default_factory=list)
    routers: list[RouterProcess] = field(default_factory=list)
    # routers in front of the first replica alone, one per event loop (the default first)
    solo: list[RouterProcess] = field(default_factory=list)
    router_log_level: str = "warning"

    def start(self, label: str, n: int, pages: int, shared_url: str = "",
              routers: int = 0, solo: bool = False) -> None:
        """Every process is launched at once (each takes seconds to import and load its
        model): the replicas' ports are fixed in their settings, so the routers start beside
        them and poll them until they answer. Returns once the replicas are ready; await
        each router's ``ready``."""
        self.stop()
        self.replicas = [ProcessServer(self.workdir / f"{label}-r{i}", settings=replica_settings(
            self.workdir, f"{label}-r{i}", self.db, pages, self.events_url, shared_url))
            for i in range(n)]
        urls = [f"http://127.0.0.1:{r.settings.http.port}" for r in self.replicas]
        self.routers = [RouterProcess(self.workdir, self.db, urls, self.events_url,
                                      self.router_log_level) for _ in range(routers)]
        if solo:
            self.solo = [RouterProcess(self.workdir, self.db, urls[:1], self.events_url,
                                       event_loop=name) for name in LOOPS]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(ProcessServer.start, self.replicas))

    def stop(self) -> None:
        """SIGTERM to every process, waited on together."""
        procs: list[RouterProcess | ProcessServer] = [*self.routers, *self.replicas]
        procs += self.solo
        if procs:
            with ThreadPoolExecutor(len(procs)) as pool:
                list(pool.map(lambda p: p.stop(), procs))
        self.routers, self.replicas, self.solo = [], [], []


async def scenario(session: aiohttp.ClientSession, fleet: Fleet, name: str,
                   convs: list[Conversation], tenants: int, admin: Admin,
                   mode: str, kill_at_s: float | None = None) -> tuple[dict[str, Any], list[int]]:
    tenant_rows = [admin.tenant(f"{name}-{t}") for t in range(tenants)]
    keys = [t.key for t in tenant_rows]
    urls = [r.url for r in fleet.replicas]
    before = await replica_counts(session, urls)
    if mode == "direct":
        def pick(i: int, c: Conversation) -> str:
            return urls[i % len(urls)]
    else:
        def pick(i: int, c: Conversation) -> str:
            return fleet.routers[(c.tenant + i) % len(fleet.routers)].url
    note = ""
    killer = None
    victim_stats: dict[str, Any] = {}
    if kill_at_s is not None:
        victim = fleet.replicas[-1]

        async def kill_and_restart() -> None:
            await asyncio.sleep(kill_at_s)
            victim_stats["before"] = await cache_tokens(session, victim.url)
            victim.kill()
            await asyncio.sleep(RESTART_AFTER_S)
            await asyncio.get_running_loop().run_in_executor(None, victim.start)
            victim_stats["back_at_s"] = time.monotonic() - t0

        killer = asyncio.create_task(kill_and_restart())
        note = (f"replica r{len(urls) - 1} SIGKILLed at {kill_at_s:g}s, restarted "
                f"{RESTART_AFTER_S:g}s later")
    t0 = time.monotonic()
    out = await replay(session, convs, keys, pick)
    if killer is not None:
        await killer
        for rt in fleet.routers:
            await rt.ready(session, len(urls))
        # the run may end before the victim is back: a second wave of the same tenants'
        # conversations (their system prompts cached elsewhere) is its traffic after restart
        t_wave = time.monotonic()
        wave_before = await cache_tokens(session, urls[-1])
        wave = [Conversation(c.tenant, c.system, ["[second wave] " + u for u in c.turns],
                             c.start_s, c.think_s) for c in convs]
        victim_stats["wave"] = await replay(session, wave, keys, pick)
        victim_stats["wave_s"] = time.monotonic() - t_wave
        wave_after = await cache_tokens(session, urls[-1])
        victim_stats["wave_tokens"] = (wave_after[0] - wave_before[0],
                                       wave_after[1] - wave_before[1])
    after = await replica_counts(session, urls)
    if kill_at_s is not None:  # the restarted replica's counters began again at zero
        before[-1] = {"requests": 0, "tokens": 0}
    row = row_of(name, out, before, after, note)
    row["wall_s"] = round(time.monotonic() - t0, 1)
    if victim_stats:  # the victim's hit ratio before the kill and over its new life
        pre, post = victim_stats["before"], victim_stats["wave_tokens"]
        wave: Outcome = victim_stats["wave"]
        row["restart"] = {
            "pre_kill_hit_ratio": _ratio(pre), "pre_kill_prompt_tokens": sum(pre),
            "restarted_hit_ratio": _ratio(post), "restarted_prompt_tokens": sum(post),
            "restarted_requests_total": after[-1]["requests"],
            "second_wave_s": round(victim_stats["wave_s"], 1),
            "second_wave_fleet_hit_ratio": round(wave.cached_tokens / wave.prompt_tokens, 4)
            if wave.prompt_tokens else None,
            "second_wave_answered": wave.answered, "second_wave_failed": wave.failed}
    for t in tenant_rows:  # leave the caches to the next scenario's tenants
        for url in urls:
            async with session.delete(url + "/admin/cache", params={"tenant_id": t.id},
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}):
                pass
    return row, [t.id for t in tenant_rows]


# Sweep: the routing rule's constants were fixed on seeds 1 and 2 (12 tenants, 0.45); the
# sweep runs on workloads none of them were tuned on.
SWEEP_SEEDS = smoke("3,5,7", "3")
SWEEP_TENANTS = smoke("12,16", "2")
SWEEP_FRACTIONS = smoke("0.3,0.6", "1.0")


@contextlib.asynccontextmanager
async def bench_fleet(args: argparse.Namespace, label: str
                      ) -> AsyncIterator[tuple[Fleet, aiohttp.ClientSession]]:
    """A fresh migrated database, a redis-server and an empty fleet (started by the
    caller), torn down together."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"kvgate-{label}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_name, db = await fresh_database()
    subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "migrate", "--db", db],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    redis_server = RedisServer().start()
    fleet = Fleet(workdir, db, redis_server.url, 0, router_log_level=args.router_log_level)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            yield fleet, session
    finally:
        fleet.stop()
        redis_server.stop()
        await drop_database(db_name)


async def overhead_async(args: argparse.Namespace) -> dict[str, Any]:
    async with bench_fleet(args, "overhead") as (fleet, session):
        fleet.start("overhead", 1, 64, solo=True)
        for router in fleet.solo:
            await router.ready(session, 1)
        tenant = Admin(fleet.replicas[0].url, ADMIN_KEY).tenant("overhead")
        return await router_overhead(session, fleet.replicas[0].url, fleet.solo, tenant.key,
                                     args.overhead_n)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


async def sweep_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration of seeds x tenant counts x cache fractions: one replica with
    three times the pages (the ceiling), three replicas round-robin (the baseline) and
    routed, each on fresh fleets (the pages follow each workload's working set)."""
    configs: list[dict[str, Any]] = []
    async with bench_fleet(args, "sweep") as (fleet, session):
        for fraction in _floats(args.sweep_fractions):
            for seed in _ints(args.sweep_seeds):
                for tenants in _ints(args.sweep_tenants):
                    convs = workload(Path(args.trace), seed, tenants, args.convs,
                                     args.turns)
                    ws = working_set_pages(convs)
                    pages = max(8, int(ws * fraction))
                    label = f"s{seed}-t{tenants}-f{fraction:g}"
                    fleet.start(label + "-single", 1, pages * REPLICAS)
                    admin = Admin(fleet.replicas[0].url, ADMIN_KEY)
                    single, _ = await scenario(session, fleet, "single-3x", convs,
                                               tenants, admin, "direct")
                    fleet.start(label, REPLICAS, pages, routers=ROUTERS)
                    for rt in fleet.routers:
                        await rt.ready(session, REPLICAS)
                    admin = Admin(fleet.replicas[0].url, ADMIN_KEY)
                    rr, _ = await scenario(session, fleet, "round-robin", convs, tenants,
                                           admin, "direct")
                    routed, _ = await scenario(session, fleet, "routed", convs, tenants,
                                               admin, "routed")
                    ceiling = single["hit_ratio"]
                    row = {"seed": seed, "tenants": tenants, "cache_fraction": fraction,
                           "requests": len(convs) * args.turns, "working_set_pages": ws,
                           "pages_per_replica": pages,
                           "single_hit_ratio": ceiling,
                           "round_robin_hit_ratio": rr["hit_ratio"],
                           "routed_hit_ratio": routed["hit_ratio"],
                           "routed_vs_single": round(routed["hit_ratio"] / ceiling, 3)
                           if ceiling and routed["hit_ratio"] is not None else None,
                           "round_robin_vs_single": round(rr["hit_ratio"] / ceiling, 3)
                           if ceiling and rr["hit_ratio"] is not None else None,
                           "routed_max_min_load": routed["max_min_load"],
                           "routed_requests_per_replica": routed["requests_per_replica"],
                           "failed": single["failed"] + rr["failed"] + routed["failed"],
                           "routed_ttft_p50_ms": routed["ttft_p50_ms"],
                           "single_ttft_p50_ms": single["ttft_p50_ms"]}
                    configs.append(row)
                    print(json.dumps(row), flush=True)
    ratios = [c["routed_vs_single"] for c in configs if c["routed_vs_single"] is not None]
    loads = [c["routed_max_min_load"] for c in configs]
    return {"configurations": configs,
            "worst": {"routed_vs_single": min(ratios) if ratios else None,
                      "round_robin_vs_single": min(
                          (c["round_robin_vs_single"] for c in configs
                           if c["round_robin_vs_single"] is not None), default=None),
                      "routed_max_min_load": None if None in loads else max(loads)},
            "mean_routed_vs_single": round(statistics.mean(ratios), 3) if ratios else None,
            "constants": {"load_slack": LOAD_SLACK, "half_life_requests": HALF_LIFE},
            "tuned_on": "seeds 1 and 2, 12 tenants, cache fraction 0.45"}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    convs = workload(Path(args.trace), args.seed, args.tenants, args.convs, args.turns)
    ws = working_set_pages(convs)
    pages = max(8, int(ws * args.cache_fraction))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvgate-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_name, db = await fresh_database()
    subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "migrate", "--db", db], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    redis_server = RedisServer().start()
    fleet = Fleet(workdir, db, redis_server.url, pages)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"seed": args.seed, "tenants": args.tenants,
                              "conversations": len(convs), "turns": args.turns,
                              "requests": len(convs) * args.turns,
                              "working_set_pages": ws, "pages_per_replica": pages,
                              "max_tokens": MAX_TOKENS, "scale": SCALE}
    shared = "shared_tier_url" in names(Settings)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            fleet.start("single", 1, pages * REPLICAS)
            admin = Admin(fleet.replicas[0].url, ADMIN_KEY)
            rows.append((await scenario(session, fleet, "single-3x", convs, args.tenants,
                                        admin, "direct"))[0])
            # and the router's cost alone (measured after the routed scenario): one replica
            # behind a router of its own, the same replica direct
            fleet.start("three", REPLICAS, pages, routers=ROUTERS, solo=True)
            for rt in fleet.routers:
                await rt.ready(session, REPLICAS)
            for rt in fleet.solo:
                await rt.ready(session, 1)
            admin = Admin(fleet.replicas[0].url, ADMIN_KEY)
            rows.append((await scenario(session, fleet, "round-robin", convs, args.tenants,
                                        admin, "direct"))[0])
            rows.append((await scenario(session, fleet, "routed", convs, args.tenants, admin,
                                        "routed"))[0])
            tenant = admin.tenant("overhead")
            result["router_overhead"] = await router_overhead(
                session, fleet.replicas[0].url, fleet.solo, tenant.key)
            for rt in fleet.solo:
                rt.stop()
            fleet.solo = []
            row, kill_tenants = await scenario(session, fleet, "kill-restart", convs,
                                               args.tenants, admin, "routed",
                                               kill_at_s=args.kill_at_s)
            row["billing"] = await billing_check(db_name, kill_tenants)
            rows.append(row)
            if shared:
                shared_db = redis_server.url.rsplit("/", 1)[0] + "/1"
                fleet.start("shared", REPLICAS, pages, shared_url=shared_db, routers=ROUTERS)
                for rt in fleet.routers:
                    await rt.ready(session, REPLICAS)
                admin = Admin(fleet.replicas[0].url, ADMIN_KEY)
                rows.append((await scenario(session, fleet, "routed+shared", convs,
                                            args.tenants, admin, "routed"))[0])
                row, kill_tenants = await scenario(session, fleet, "kill-restart+shared",
                                                   convs, args.tenants, admin, "routed",
                                                   kill_at_s=args.kill_at_s)
                row["billing"] = await billing_check(db_name, kill_tenants)
                rows.append(row)
            else:
                rows.append({"scenario": "routed+shared", "note": "not run: no "
                             "--shared-tier-url in this build"})
    finally:
        fleet.stop()
        redis_server.stop()
        await drop_database(db_name)
    result["scenarios"] = rows
    by = {r["scenario"]: r for r in rows}
    big, routed = by["single-3x"].get("hit_ratio"), by["routed"].get("hit_ratio")
    result["goals"] = {
        "routed_vs_single_hit_ratio": round(routed / big, 3) if big and routed else None,
        "routed_max_min_load": by["routed"].get("max_min_load"),
        "router_added_p50_ms_models": result["router_overhead"]["models"]["added_p50_ms"],
        "router_added_p50_ms_chat": result["router_overhead"]["chat"]["added_p50_ms"],
    }
    for name in ("kill-restart", "kill-restart+shared"):
        if "restart" in by.get(name, {}):
            r = by[name]["restart"]
            pre, post = r["pre_kill_hit_ratio"], r["restarted_hit_ratio"]
            result["goals"][f"{name}_restarted_vs_pre_kill_hit_ratio"] = (
                round(post / pre, 3) if pre and post is not None else None)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=os.environ.get("KVGATE_TRACE") or str(
                   Path(__file__).resolve().parent / "traces" / "mooncake-conversation.jsonl"),
                   help="the Mooncake conversation trace (JSON lines; also KVGATE_TRACE; "
                        "default: bench/traces/)")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--tenants", type=int, default=smoke(12, 2))
    p.add_argument("--convs", type=int, default=smoke(2, 1), help="conversations per tenant")
    p.add_argument("--turns", type=int, default=smoke(4, 2))
    p.add_argument("--cache-fraction", type=float, default=smoke(0.45, 1.0),
                   help="one replica's device pages as a fraction of the working set")
    p.add_argument("--kill-at-s", type=float, default=smoke(3.0, 1.0))
    p.add_argument("--workdir", default="")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--sweep", action="store_true",
                   help="seeds x tenant counts x cache fractions (the single, round-robin "
                        "and routed scenarios each); written under 'sweep' in cluster.json")
    p.add_argument("--sweep-seeds", default=SWEEP_SEEDS, help=f"({SWEEP_SEEDS})")
    p.add_argument("--sweep-tenants", default=SWEEP_TENANTS, help=f"({SWEEP_TENANTS})")
    p.add_argument("--sweep-fractions", default=SWEEP_FRACTIONS, help=f"({SWEEP_FRACTIONS})")
    p.add_argument("--sweep-rerun", action="store_true",
                   help="with --sweep: append the configurations' results to the sweep's "
                        "'reruns' (run-to-run variation) instead of replacing the sweep")
    p.add_argument("--overhead", action="store_true",
                   help="only the router's own latency (one replica, direct and through a "
                        "router of its own); written under 'router_overhead'")
    p.add_argument("--overhead-n", type=int, default=ROUTER_OVERHEAD_N,
                   help=f"requests timed each way per endpoint ({ROUTER_OVERHEAD_N})")
    p.add_argument("--router-log-level", default="warning",
                   help="the routers' --log-level (debug: every decision, in the workdir)")
    args = p.parse_args()
    if args.overhead:
        overhead = asyncio.run(overhead_async(args))
        print("router overhead:", json.dumps(overhead, indent=1))
        if not args.no_write:
            previous = _previous()
            write_result("cluster", {**previous, "router_overhead": overhead,
                                     "goals": {**previous.get("goals", {}),
                                               "router_added_p50_ms_models":
                                                   overhead["models"]["added_p50_ms"],
                                               "router_added_p50_ms_chat":
                                                   overhead["chat"]["added_p50_ms"]}})
        return
    if args.sweep:
        sweep = asyncio.run(sweep_async(args))
        print_table(sweep["configurations"], "cluster sweep")
        print("worst:", sweep["worst"])
        if not args.no_write:
            previous = _previous()
            if args.sweep_rerun:  # the same configurations again: how much one run varies
                kept = previous.get("sweep") or {}
                kept.setdefault("reruns", []).extend(sweep["configurations"])
                sweep = kept
            write_result("cluster", {**previous, "sweep": sweep})
        return
    result = asyncio.run(main_async(args))
    table = [{k: v for k, v in r.items() if k not in ("note", "billing", "restart")}
             for r in result["scenarios"]]
    print_table(table, f"cluster: {result['requests']} requests per scenario, seed "
                f"{result['seed']}, {result['pages_per_replica']} pages per replica "
                f"(working set {result['working_set_pages']})")
    for r in result["scenarios"]:
        if r.get("note") or r.get("billing"):
            print(f"  {r['scenario']}: {r.get('note', '')} {r.get('billing', '')} "
                  f"{r.get('restart', '')}")
    print("router overhead:", result["router_overhead"])
    print("goals:", result["goals"])
    if not args.no_write:
        previous = _previous()
        write_result("cluster", {**result, **({"sweep": previous["sweep"]}
                                              if "sweep" in previous else {})})


def _previous() -> dict[str, Any]:
    """cluster.json as it stands (a sweep and a single run each keep the other's part)."""
    path = Path(__file__).resolve().parent / "results" / "cluster.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k != "machine"} if isinstance(data, dict) else {}


if __name__ == "__main__":
    main()
