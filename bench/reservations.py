"""What isolation costs: one eviction order (the default), fair shares, reservations.

Run: ``python -m bench.reservations`` (a few minutes on two cores). Every request is
replayed through the real ``CacheStore`` (one tier, TTL 300 s, the adaptive order), as in
``bench.policy``, on two multi-tenant traces:

- ``16 tenants``: the Mooncake conversation trace with its conversations spread over 16
  tenants (a conversation's first block of its own decides its tenant), so tenants share
  nothing and compete for one cache;
- ``2 + scanner``: ``bench.policy``'s multi-tenant replay (both Mooncake traces as two
  tenants, a third scanning one-off documents).

Per trace and capacity (device blocks) it reports the hit rate, overall and of the
tenants that reserve, for:

- ``lru``: the default with plain LRU (the baseline);
- ``default``: what ``kvgate serve`` does by default: the adaptive order over all tenants,
  nothing protected;
- ``fair``: fair shares for every active tenant (``--cache-shares 1``, the former default);
- ``reserved``: the default plus reservations for the tenants that buy one: on ``16
  tenants`` the two busiest (by prompt blocks) reserve an eighth of the capacity each, on
  ``2 + scanner`` each Mooncake tenant reserves a quarter;
- ``ceiling``: the default with unbounded capacity (what no eviction can beat).

Goals (the cache-as-a-product issue): the default loses nothing to isolation (it is the
no-isolation run); the price of reservations (overall hit rate, reserved vs default) is
measured, not hidden. Capacities 1500 and 6000 are the ones the issue measured shares on.
Writes ``bench/results/reservations.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from multiprocessing import Pool
from typing import Any

from bench.common import print_table, smoke, write_result
from bench.policy import MOONCAKE, TRACES, Trace, load_trace, replay_store

TENANTS = 16
CAPACITIES = smoke((750, 1500, 3000, 6000), (750,))
UNBOUNDED = 10**7


def spread(trace: Trace, tenants: int = TENANTS) -> Trace:
    """The trace's conversations over ``tenants`` tenants: a request's tenant is decided by
    its first block past the blocks every conversation shares (a later turn repeats its
    conversation's prompt, so it keeps its tenant)."""
    common = 0  # blocks at the head of every request (a shared system prompt)
    first = trace.requests[0].tokens
    while all(len(r.tokens) > common and common < len(first)
              and r.tokens[common] == first[common] for r in trace.requests):
        common += 1
    out = []
    for r in trace.requests:
        key = int(r.tokens[min(common, len(r.tokens) - 1)])
        out.append(replace(r, namespace=f"tenant:{key % tenants}"))
    return Trace(f"{trace.name}-{tenants}", trace.block_size, out)


_TRACES: dict[str, Trace] = {}


def trace_of(name: str) -> Trace:
    if name not in _TRACES:
        _TRACES[name] = (spread(load_trace("mooncake-conversation")) if name == "16 tenants"
                         else load_trace("multi-tenant"))
    return _TRACES[name]


def buyers(name: str, capacity: int) -> dict[str, int]:
    """The tenants that reserve, and how many blocks each."""
    trace = trace_of(name)
    if name == "2 + scanner":
        return {ns: capacity // 4 for ns in ("tenant:conversation", "tenant:synthetic")}
    volume: dict[str, int] = {}
    for r in trace.requests:
        volume[r.namespace] = volume.get(r.namespace, 0) + len(r.blocks)
    busiest = sorted(volume, key=lambda ns: -volume[ns])[:2]
    return {ns: capacity // 8 for ns in busiest}


Job = tuple[str, str, int]  # trace, arm, capacity


def run(job: Job) -> tuple[Job, dict[str, float]]:
    name, arm, capacity = job
    trace = trace_of(name)
    if arm == "lru":
        return job, replay_store(trace, capacity, "lru")
    if arm == "fair":
        return job, replay_store(trace, capacity, shares=True)
    if arm == "reserved":
        return job, replay_store(trace, capacity, reserved=buyers(name, capacity))
    if arm == "ceiling":
        return job, replay_store(trace, UNBOUNDED)
    return job, replay_store(trace, capacity)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    started = time.perf_counter()
    if not all((TRACES / f"{n}.jsonl").exists() for n in MOONCAKE):
        raise SystemExit(f"the Mooncake traces are not in {TRACES}")
    names = ["16 tenants", "2 + scanner"]
    jobs: list[Job] = [(n, "ceiling", 0) for n in names]
    jobs += [(n, arm, c) for n in names for c in CAPACITIES
             for arm in ("lru", "default", "fair", "reserved")]
    got: dict[Job, dict[str, float]] = {}
    with Pool(args.workers) as pool:
        for job, result in pool.imap_unordered(run, sorted(jobs, key=lambda j: -j[2])):
            got[job] = result
            print(f"  {job}: {result['']:.4f}", flush=True)
    out: dict[str, Any] = {"tenants": TENANTS, "capacities": list(CAPACITIES), "traces": {}}
    for name in names:
        ceiling = got[(name, "ceiling", 0)][""]
        rows = []
        for c in CAPACITIES:
            paying = buyers(name, c)
            default = got[(name, "default", c)]

            def of(result: dict[str, float], who: dict[str, int] = paying) -> float:
                return round(sum(result[ns] for ns in who) / len(who), 4)

            rows.append({
                "capacity_blocks": c,
                "lru": round(got[(name, "lru", c)][""], 4),
                "default": round(default[""], 4),
                "fair": round(got[(name, "fair", c)][""], 4),
                "reserved": round(got[(name, "reserved", c)][""], 4),
                "ceiling": round(ceiling, 4),
                "fair_vs_default": round(got[(name, "fair", c)][""] / default[""] - 1, 4),
                "reserved_vs_default": round(got[(name, "reserved", c)][""] / default[""] - 1, 4),
                "buyers_default": of(default),
                "buyers_reserved": of(got[(name, "reserved", c)]),
                "buyers_reserved_blocks": sum(paying.values()),
            })
        print_table(rows, f"{name}: hit rate (buyers: mean hit rate of the tenants that reserve)")
        out["traces"][name] = rows
    out["seconds"] = round(time.perf_counter() - started, 1)
    write_result("reservations", out)


if __name__ == "__main__":
    main()
