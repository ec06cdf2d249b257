"""Ledger throughput: committed usage events per second through the group committer.

Each `record` returns only after its transaction committed (SQLite: WAL, synchronous=FULL,
so every COMMIT is an fsync). Many concurrent callers share commits; one caller alone
shows what a commit costs without batching. Also times usage reports over a larger table.

Run: ``python -m bench.ledger [--events 20000] [--concurrency 200] [--report-rows 200000]``.

Prints a table and writes bench/results/ledger.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import smoke, write_result
from kvgate.gateway.ledger import Billed, Ledger, UsageEvent
from kvgate.gateway.ledger.committer import usage_row
from kvgate.gateway.ledger.models import UsageRow
from kvgate.gateway.usage import Usage

START = datetime(2026, 1, 1, tzinfo=UTC)
WARM_EVENTS = smoke(200, 20)  # recorded before the timed runs, not measured


def _event(tenant_id: int, n: int, tag: str) -> UsageEvent:
    t = START + timedelta(seconds=n)
    return UsageEvent(f"{tag}-{n}", tenant_id, None, f"model-{n % 3}", "chat.completions",
                      Usage(1000 + n % 500, 512, {300: 256}, 100 + n % 50), "ok", t, t, 20)


async def _throughput(ledger: Ledger, tenant_id: int, events: int, concurrency: int,
                      tag: str) -> dict[str, Any]:
    commits: list[tuple[float, int]] = []
    ledger.on_commit = lambda s, n: commits.append((s, n))
    counter = iter(range(events))

    async def worker() -> None:
        for n in counter:
            await ledger.record(_event(tenant_id, n, tag))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    ledger.on_commit = None
    secs = sorted(s for s, _ in commits)
    return {"events": events, "concurrency": concurrency, "seconds": round(elapsed, 3),
            "events_per_s": round(events / elapsed),
            "commits": len(commits), "mean_batch": round(events / max(len(commits), 1), 1),
            "commit_ms_p50": round(1000 * statistics.median(secs), 2),
            "commit_ms_p99": round(1000 * secs[int(0.99 * (len(secs) - 1))], 2)}


async def _bulk_fill(ledger: Ledger, tenant_ids: list[int], rows: int) -> None:
    """Background rows for the report timing, inserted directly (not what is measured)."""
    table = UsageRow.__table__
    chunk = 5000
    for base in range(0, rows, chunk):
        values = []
        for n in range(base, min(base + chunk, rows)):
            e = _event(tenant_ids[n % len(tenant_ids)], n, "fill")
            values.append({**usage_row(e, Billed(new=True, cost_micros=1, currency="USD")),
                           "started_at": START + timedelta(minutes=n), "finished_at": START})
        async with ledger.engine.begin() as conn:
            await conn.execute(table.insert(), values)


async def _reports(ledger: Ledger, tenant_id: int) -> dict[str, float]:
    out = {}
    for name, kwargs in [
            ("report_tenant_month_by_day_ms", {"tenant_id": tenant_id, "since": START,
                                                "until": START + timedelta(days=30)}),
            ("report_tenant_all_by_model_ms", {"tenant_id": tenant_id, "group_by": "model"}),
            ("report_all_tenants_by_day_ms", {})]:
        t0 = time.perf_counter()
        await ledger.usage_report(**kwargs)
        out[name] = round(1000 * (time.perf_counter() - t0), 1)
    return out


async def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    ledger = await Ledger.open(url)
    try:
        tenants = [(await ledger.create_tenant(f"bench-{i}"))["id"] for i in range(20)]
        await _throughput(ledger, tenants[0], WARM_EVENTS, args.concurrency, "warm")
        result = await _throughput(ledger, tenants[0], args.events, args.concurrency, "conc")
        single = await _throughput(ledger, tenants[1], args.single_events, 1, "single")
        result["single_caller_events_per_s"] = single["events_per_s"]
        result["single_caller_commit_ms_p50"] = single["commit_ms_p50"]
        if args.report_rows:
            await _bulk_fill(ledger, tenants, args.report_rows)
            result["report_rows"] = (args.report_rows + args.events + args.single_events
                                    + WARM_EVENTS)
            result.update(await _reports(ledger, tenants[2]))
        return result
    finally:
        await ledger.close()


async def _pg_database(admin_url: str, name: str, create: bool) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"' if create
                           else f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"sqlite_events_per_s": None, "postgres_events_per_s": None}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = await bench(f"sqlite:///{tmp}/bench.db", args)
        results["sqlite"]["durability"] = "WAL, synchronous=FULL (fsync per commit)"
    results["sqlite_events_per_s"] = results["sqlite"]["events_per_s"]
    name = f"kvgate_bench_{uuid.uuid4().hex[:8]}"
    try:
        await _pg_database(args.pg, name, create=True)
    except (OSError, asyncpg.PostgresError) as exc:
        results["postgres"] = {"skipped": f"PostgreSQL unreachable: {exc!r}"}
    else:
        try:
            base = args.pg.rpartition("/")[0]
            results["postgres"] = await bench(f"{base}/{name}", args)
            results["postgres_events_per_s"] = results["postgres"]["events_per_s"]
        finally:
            await _pg_database(args.pg, name, create=False)
    results["config"] = {"events": args.events, "concurrency": args.concurrency,
                         "cpus": os.cpu_count(), "python": sys.version.split()[0],
                         "load_avg_1m": round(os.getloadavg()[0], 2)}
    return results


def _print(results: dict[str, Any]) -> None:
    keys = ["events_per_s", "mean_batch", "commit_ms_p50", "commit_ms_p99",
            "single_caller_events_per_s", "single_caller_commit_ms_p50", "report_rows",
            "report_tenant_month_by_day_ms", "report_tenant_all_by_model_ms",
            "report_all_tenants_by_day_ms"]
    print(f"{'metric':32} {'sqlite':>12} {'postgres':>12}")
    for k in keys:
        cells = [str(results.get(db, {}).get(k, "-")) for db in ("sqlite", "postgres")]
        print(f"{k:32} {cells[0]:>12} {cells[1]:>12}")
    if "skipped" in results.get("postgres", {}):
        print("postgres:", results["postgres"]["skipped"])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=smoke(20_000, 200))
    p.add_argument("--concurrency", type=int, default=smoke(200, 20))
    p.add_argument("--single-events", type=int, default=smoke(300, 20))
    p.add_argument("--report-rows", type=int, default=smoke(200_000, 2_000))
    p.add_argument("--pg", default=os.environ.get(
        "KVGATE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--out", type=Path, help="write here instead of bench/results/ledger.json")
    args = p.parse_args()
    res = asyncio.run(main(args))
    _print(res)
    if args.out is None:
        write_result("ledger", res)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
