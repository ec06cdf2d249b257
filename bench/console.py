"""How fast the operator console draws each view with many tenants and a month of usage.

A real server (demo model, SQLite ledger) is seeded straight into its ledger file with
``--tenants`` tenants (one key each) and ``--days`` days of usage (``--per-day`` events per
tenant per day, spread over the hours, some with cache hits, a few failed). The system's
Chromium, driven by Playwright, signs in and opens each view ``--repeat`` times. A view's
time is what the page itself measures: from the route change, through its admin API calls
(JSON over loopback, SQL GROUP BY in the ledger), to the new view laid out. The API calls
are also timed alone (``requests``), so the table shows how much is the server.

Two datasets: a baseline (10 tenants, 1 day: the floor of a view's cost, nearly all fixed
overhead) and the target (1,000 tenants, 30 days). The page was written against small
ledgers; the target data was not used to tune it.

Run: ``python -m bench.console [--tenants 1000] [--days 30] [--per-day 4] [--repeat 5]``
(needs Chromium: Debian's ``chromium``, or KVGATE_TEST_CHROMIUM). Prints a table and
writes bench/results/console.json. A benchmark, never a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from bench.common import print_table, smoke, write_result
from testkit import ADMIN_KEY, MiB, ThreadServer

VIEWS = ("overview", "tenants", "tenant", "actions")


def seed(db: Path, tenants: int, days: int, per_day: int, rng: random.Random) -> dict[str, int]:
    """Tenants, keys and usage rows written straight into the migrated SQLite ledger (the
    ledger's own path bills one request at a time; this is bulk history)."""
    con = sqlite3.connect(db)
    try:
        plan_id = con.execute("SELECT id FROM plans WHERE name = 'default'").fetchone()[0]
        now = datetime.now(UTC).replace(tzinfo=None)
        created = (now - timedelta(days=days + 1)).isoformat(" ")
        first = con.execute("SELECT COALESCE(MAX(id), 0) FROM tenants").fetchone()[0] + 1
        con.executemany(
            "INSERT INTO tenants (id, name, status, plan_id, cache_ttl_seconds, created_at) "
            "VALUES (?, ?, 'active', ?, 300, ?)",
            [(first + i, f"bench-tenant-{i:05d}", plan_id, created) for i in range(tenants)])
        con.executemany(
            "INSERT INTO api_keys (tenant_id, role, prefix, key_sha256, created_at) "
            "VALUES (?, 'tenant', ?, ?, ?)",
            [(first + i, f"kvg_b{i:05d}", f"{i:064x}", created) for i in range(tenants)])
        keys = dict(con.execute("SELECT tenant_id, id FROM api_keys WHERE tenant_id >= ?",
                                (first,)).fetchall())
        rows = []
        n = 0
        for i in range(tenants):
            tid = first + i
            for d in range(days):
                for _ in range(per_day):
                    started = now - timedelta(days=d, seconds=rng.randrange(86_400))
                    prompt = rng.randrange(200, 4000)
                    cached = rng.randrange(0, prompt // 16) * 16 if rng.random() < 0.7 else 0
                    write = min(prompt - cached, 16 * rng.randrange(0, 8))
                    out = rng.randrange(10, 300)
                    cost = (prompt - cached - write) + cached // 10 + write * 5 // 4 + out * 4
                    status = "error" if rng.random() < 0.01 else "ok"
                    n += 1
                    rows.append((f"bench-{tid}-{n}", tid, keys[tid], f"model-{n % 3}",
                                 "chat.completions", prompt, cached, write, 0, out, cost,
                                 "USD", status, started.isoformat(" "), started.isoformat(" "),
                                 rng.randrange(20, 400)))
        con.executemany(
            "INSERT INTO usage_events (request_id, tenant_id, key_id, model, endpoint, "
            "prompt_tokens, cached_tokens, cache_write_5m_tokens, cache_write_1h_tokens, "
            "completion_tokens, cost_micros, currency, status, started_at, finished_at, "
            "ttft_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.commit()
        return {"tenants": tenants, "usage_rows": len(rows), "first_tenant": first}
    finally:
        con.close()


def _api_calls(view: str, tenant_id: int) -> list[str]:
    q = f"tenant_id={tenant_id}"
    return {
        "overview": ["/admin/usage/series?bucket=hour&since=24h", "/admin/cache/stats",
                     "/admin/cache/history"],
        "tenants": ["/admin/tenants", "/admin/usage/series?bucket=all&group_by=tenant&since=30d",
                    "/admin/cache/stats"],
        "tenant": [f"/admin/tenants/{tenant_id}", f"/admin/tenants/{tenant_id}/keys",
                   f"/admin/usage/series?bucket=day&since=30d&{q}",
                   f"/admin/usage/series?bucket=all&group_by=key&since=30d&{q}",
                   f"/admin/usage/series?bucket=all&group_by=model&since=30d&{q}",
                   f"/admin/cache/prefixes?limit=10&{q}", "/admin/cache/stats"],
        "actions": ["/admin/tenants"],
    }[view]


def measure(srv: ThreadServer, browser: Any, tenant_id: int, repeat: int) -> list[dict[str, Any]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(srv.url + "/admin/ui")
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#view[data-view='overview'][data-ready]", timeout=120_000)
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    out = []
    for view in VIEWS:
        target = "#" + (f"tenant/{tenant_id}" if view == "tenant" else view)
        page_ms, api_ms, wall_ms = [], [], []
        for _ in range(repeat):
            page.evaluate("location.hash = '#'")  # leave, so the next visit draws afresh
            page.wait_for_selector("#view[data-view='overview'][data-ready]", timeout=120_000)
            t0 = time.perf_counter()
            page.evaluate(f"location.hash = {target!r}")
            page.wait_for_selector(f"#view[data-view='{view}'][data-ready]", timeout=120_000)
            wall_ms.append((time.perf_counter() - t0) * 1000)
            page_ms.append(float(page.get_attribute("#view", "data-ms") or "nan"))
            t1 = time.perf_counter()
            for path in _api_calls(view, tenant_id):  # one after another: the page runs them
                assert http.get(srv.url + path, timeout=120).status_code == 200  # in parallel
            api_ms.append((time.perf_counter() - t1) * 1000)
        rows = page.locator("#view tbody tr").count()
        out.append({"view": view, "render_ms_median": statistics.median(page_ms),
                    "render_ms_max": max(page_ms), "wall_ms_median": statistics.median(wall_ms),
                    "api_serial_ms_median": statistics.median(api_ms), "table_rows": rows})
    page.close()
    http.close()
    return out


def run_dataset(browser: Any, tenants: int, days: int, per_day: int, repeat: int,
                seed_value: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="kvgate-bench-console-"))
    try:
        with ThreadServer(workdir, device="cpu", device_cache_bytes=16 * MiB,
                          host_cache_bytes=16 * MiB) as srv:
            t0 = time.perf_counter()
            info = seed(workdir / "ledger.db", tenants, days, per_day, random.Random(seed_value))
            info["seed_s"] = round(time.perf_counter() - t0, 2)
            busiest = info["first_tenant"]
            views = measure(srv, browser, busiest, repeat)
        return {"tenants": tenants, "days": days, "per_day": per_day, **info, "views": views}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=smoke(1000, 20))
    parser.add_argument("--days", type=int, default=smoke(30, 2))
    parser.add_argument("--per-day", type=int, default=smoke(4, 2))
    parser.add_argument("--repeat", type=int, default=smoke(5, 1))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from testkit.browser import find_chromium

    exe = find_chromium()
    if exe is None:
        raise SystemExit("no Chromium found: install Debian's chromium or set "
                         "KVGATE_TEST_CHROMIUM")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        version = browser.version
        try:
            datasets = [
                ("baseline", run_dataset(browser, 10, 1, args.per_day, args.repeat, 1)),
                ("target", run_dataset(browser, args.tenants, args.days, args.per_day,
                                       args.repeat, 2)),
            ]
        finally:
            browser.close()
    table = [{"dataset": name, "tenants": d["tenants"], "usage_rows": d["usage_rows"], **v}
             for name, d in datasets for v in d["views"]]
    print_table(table, "Console views: page-measured render (route change → API calls → "
                       "laid out), ms")
    write_result("console", {
        "what": "time for each console view to draw in headless Chromium: its admin API "
                "calls (in parallel) and DOM build and layout, measured by the page",
        "command": f"python -m bench.console --tenants {args.tenants} --days {args.days} "
                   f"--per-day {args.per_day} --repeat {args.repeat}",
        "chromium": version, "datasets": dict(datasets), "table": table})


if __name__ == "__main__":
    main()
