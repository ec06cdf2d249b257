"""The engine core in its own process against one process, side by side on one machine.

Starts two servers, ``--api-servers 0`` (engine thread and HTTP under one GIL) and
``--api-servers 1`` (the engine core process and one API server), and runs ``bench.load``
against each with 1 and with 64 clients, in the order 0/1, 1/1, 0/64, 1/64 so both sides
of a pair run back to back. Goals (64 clients, split): overhead p50 ≤ 2× the 1-client
figure and ≤ 5 ms, p99 ≤ 20 ms, requests/s ≥ 1.3× one process's.

Run: ``python -m bench.load_split [--requests N] [--duration S]`` (the demo model).
Writes ``bench/results/load_split.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from bench import load
from bench.common import print_table, smoke, write_result
from testkit import ADMIN_KEY, MiB, ProcessServer

NOTES = (
    "Demo model, 2 cores, no GPU. The engine is compute-bound here (TTFT of seconds at 64 "
    "clients: requests queue for the model), so neither layout changes requests/s. The "
    "gateway's in-server overhead at 64 clients (~10 ms p50) splits, by a breakdown timed "
    "inside the server for one run of each layout (320 requests): parsing to submit ~1 ms, "
    "the ledger's group commit ~4.4 ms (5.5 in one process, where its thread shares the "
    "GIL with the engine's), and the hop between submit and the engine's own clock ~2.2 ms "
    "split (~1.5 ms in one process; 3.6 ms before the engine thread wrote its frames "
    "itself). What one process loses to the GIL is small next to the ledger commit, which "
    "a request waits for before its last bytes (billing exactly once).")

FIGURES = ("requests_per_s", "overhead_p50_ms", "overhead_p99_ms", "overhead_in_server_p50_ms",
           "ttft_hit_p50_ms", "ttft_miss_p50_ms", "latency_p50_ms", "ok", "requests")


def run(url: str, argv: list[str]) -> dict[str, Any]:
    args = load.parse_args([*argv, "--url", url, "--admin-key", ADMIN_KEY, "--no-write"])
    asyncio.run(load.main(args))
    result: dict[str, Any] = args.result
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=smoke(640, 16))
    p.add_argument("--duration", type=float, default=smoke(90.0, 10.0))
    p.add_argument("--clients", type=int, default=smoke(64, 4))
    args = p.parse_args()
    common = ["--requests", str(args.requests), "--duration", str(args.duration),
              "--probes", "0"]
    runs: dict[str, dict[str, Any]] = {}
    # one server per layout, both started first (an idle one costs nothing), as bench.load
    # starts its own
    servers = {n: ProcessServer(device_cache_bytes=64 * MiB, host_cache_bytes=64 * MiB,
                                max_queue=1024, api_servers=n) for n in (0, 1)}
    try:
        for srv in servers.values():
            srv.start()
        for clients in (1, args.clients):
            for n, srv in servers.items():
                name = f"api_servers={n} clients={clients}"
                print(f"\n== {name}", flush=True)
                runs[name] = run(srv.url, [*common, "--clients", str(clients)])
    finally:
        for srv in servers.values():
            srv.close()
    rows = [{"run": name, **{k: r.get(k) for k in FIGURES}} for name, r in runs.items()]
    print_table(rows, "one process (api_servers=0) vs engine core process (api_servers=1)")
    one, many = f"api_servers=1 clients={args.clients}", f"api_servers=0 clients={args.clients}"
    single = "api_servers=1 clients=1"
    split, base, alone = runs[one], runs[many], runs[single]
    goals = {
        "overhead_p50_vs_1_client": _ratio(split["overhead_p50_ms"], alone["overhead_p50_ms"]),
        "overhead_p50_ms": split["overhead_p50_ms"],
        "overhead_p99_ms": split["overhead_p99_ms"],
        "requests_per_s_vs_one_process": _ratio(split["requests_per_s"], base["requests_per_s"]),
    }
    goals["met"] = bool(
        (goals["overhead_p50_vs_1_client"] or 1e9) <= 2.0
        and (goals["overhead_p50_ms"] or 1e9) <= 5.0
        and (goals["overhead_p99_ms"] or 1e9) <= 20.0
        and (goals["requests_per_s_vs_one_process"] or 0.0) >= 1.3)
    for k, v in goals.items():
        print(f"  {k}: {v}")
    write_result("load_split", {"model": "demo", "runs": runs, "goals": goals, "notes": NOTES})
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


if __name__ == "__main__":
    sys.exit(main())
