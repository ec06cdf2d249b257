"""The local disk tier (``--disk-cache-dir``): what it saves, and what it keeps across a restart.

1. Time to first token for a 2k- and an 8k-token prefix (plus a new 32-token suffix),
   per rep a fresh prefix, measured interleaved so load elsewhere falls on all alike:
   - recompute_ms: an engine without the prefix anywhere (every token computed);
   - host_ms: the prefix in the engine's host tier (its device pages demoted first);
   - disk_ms: a restarted engine (same model and weights, same directory, empty device and
     host tiers) reading the prefix from its disk;
   - device_ms: the prefix still on the device (the ceiling).
2. Hit rate of the two Mooncake traces (``bench/traces``) replayed through a real
   ``CacheStore`` (a tiny layout, as ``bench.policy`` does) at device capacities of 1,000
   and 2,000 blocks with a host tier 4x that, without and with a disk tier 10x the host
   tier. The disk tier is the real one, on files, fetched before each request's match and
   adopted as the engine does, its clock the trace's.
3. A restart: the conversation trace replayed with the disk tier, the replica replaced
   (store and tier closed, a new one opened on the directory: its index rebuilt from the
   files) at the trace's midpoint. Hit rate in the minute before the restart, and in the
   second minute after it, beside the same minutes of a replay that is never restarted.

Run: ``python -m bench.disk_tier [--model demo|smollm2] [--reps 3]``; writes
``bench/results/disk_tier.json``. ``KVGATE_BENCH_SMOKE=1``: tiny sizes, nothing written.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import print_table, smoke, write_result
from bench.policy import DEFAULT_TTL_S, HOST_FACTOR, MOONCAKE, Trace, load_trace
from bench.ttft import ttft
from kvgate.cachestore import CacheStore
from kvgate.cachestore.block import DEVICE
from kvgate.cachestore.disk_tier import DiskTier, DiskTierConfig, record_size
from kvgate.gateway.engine import EngineConfig
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model
from kvgate.kernels.layout import KVLayout

PREFIXES = smoke((2048, 8064), (128, 256))  # 8064: 8k less room for the suffix (8k context)
SUFFIX, BLOCK = 32, 16
CAPACITIES = smoke((1000, 2000), (50,))
DISK_FACTOR = 10  # the disk tier holds 10x the host tier
MINUTE = 60.0


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).tolist()


# -- 1. time to first token ---------------------------------------------------------------
async def to_host(engine: Engine) -> int:
    """Demote every idle device block to the host (on the engine thread)."""
    def demote() -> int:
        store = engine.store
        with store._lock:
            n = store.policy.num_evictable(DEVICE)
            store.tiers.reserve_device(store.device.num_free + n, None)
            return n
    return await engine._call(demote)


async def measure_ttft(model: str, reps: int, workdir: Path) -> list[dict[str, Any]]:
    loaded = load_model(EngineConfig(model=model))
    big = 1 << 30
    disk = DiskTierConfig(path=str(workdir / "ttft"), capacity_bytes=8 * big,
                          write_bytes_per_s=4 * big, queue_bytes=big)
    plain = Engine(EngineConfig(model=model, device_cache_bytes=big, host_cache_bytes=0),
                   loaded=loaded)
    host = Engine(EngineConfig(model=model, device_cache_bytes=big, host_cache_bytes=big),
                  loaded=loaded)
    writer = Engine(EngineConfig(model=model, device_cache_bytes=big, host_cache_bytes=0,
                                 disk_tier=disk), loaded=loaded)
    rows = []
    for e in (plain, host, writer):
        await e.start()
        await ttft(e, "warmup", "warmup", tokens(2, 64))
    suffix = iter(tokens(500 + i, SUFFIX) for i in range(100 * reps))
    prefixes = {n: [tokens(1000 * n + i, n) for i in range(reps)] for n in PREFIXES}
    # the prefixes reach the disk through a first engine, which then stops (a restart)
    for n, group in prefixes.items():
        for i, prefix in enumerate(group):
            await ttft(writer, f"w{n}-{i}", "t", prefix + next(suffix))
    assert writer.remote is not None and writer.remote.drain(120)
    await writer.stop()
    reader = Engine(EngineConfig(model=model, device_cache_bytes=big, host_cache_bytes=0,
                                 disk_tier=disk), loaded=loaded)
    await reader.start()
    try:
        for n, group in prefixes.items():
            times: dict[str, list[float]] = {k: [] for k in ("recompute", "host", "disk",
                                                             "device")}
            for i, prefix in enumerate(group):
                t, cached = await ttft(plain, f"r{n}-{i}", f"p{n}-{i}", prefix + next(suffix))
                assert cached == 0
                times["recompute"].append(t)
                await ttft(host, f"h0{n}-{i}", "t", prefix + next(suffix))
                await to_host(host)
                t, cached = await ttft(host, f"h{n}-{i}", "t", prefix + next(suffix))
                assert cached == n, (cached, n)
                times["host"].append(t)
                t, cached = await ttft(reader, f"d{n}-{i}", "t", prefix + next(suffix))
                assert cached == n, (cached, n)
                times["disk"].append(t)
                t, cached = await ttft(reader, f"v{n}-{i}", "t", prefix + next(suffix))
                assert cached == n
                times["device"].append(t)
            row: dict[str, Any] = {"model": model, "prefix_tokens": n}
            for k, v in times.items():
                row[f"{k}_ms"] = statistics.median(v) * 1e3
            row["disk_speedup"] = row["recompute_ms"] / row["disk_ms"]
            rows.append(row)
        stats = reader.store.stats().disk
        assert stats is not None and stats.errors == 0
    finally:
        for e in (plain, host, reader):
            await e.stop()
    return rows


# -- 2 and 3. trace replays ----------------------------------------------------------------
class Replica:
    """A real CacheStore (tiny layout: a trace block is one 'token') with an optional disk
    tier on ``path``, run as the engine runs it: fetch, adopt, match, commit, release."""

    def __init__(self, trace: Trace, capacity: int, now: list[float], path: Path | None,
                 disk_blocks: int) -> None:
        self.layout = KVLayout(1, 1, 1, trace.block_size, torch.float32)
        pb = self.layout.page_bytes
        self.now = now
        self.store = CacheStore(self.layout, capacity * pb, HOST_FACTOR * capacity * pb,
                                clock=lambda: now[0], default_ttl_s=DEFAULT_TTL_S)
        self.disk: DiskTier | None = None
        if path is not None:
            record = record_bytes(self.layout, trace)
            self.disk = DiskTier(DiskTierConfig(path=str(path),
                                                capacity_bytes=disk_blocks * record,
                                                write_bytes_per_s=1 << 40, queue_bytes=1 << 30,
                                                writers=1),
                                 self.layout, "bench", wall_clock=lambda: now[0])
            self.store.attach_tier(self.disk, None)
        self.n = 0

    def serve(self, namespace: str, tokens: Any, ttl_s: float) -> int:
        """One request; → blocks found in the cache (any tier)."""
        store = self.store
        self.n += 1
        seq = store.open(str(self.n), namespace, default_ttl_s=ttl_s)
        if self.disk is not None:
            fetched = store.fetch_remote(namespace, tokens)
            if fetched is not None:
                store.adopt_remote(seq, tokens, fetched)
        m = store.match(seq, tokens)
        hit = 0
        if store.allocate(seq, len(tokens)):
            hit = m.num_blocks
            store.commit(seq, tokens)
        store.release(seq)
        if self.disk is not None:
            self.disk.drain(60)  # the trace's time stands still while the writer runs
        return hit

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


def record_bytes(layout: KVLayout, trace: Trace) -> int:
    """One record's size on disk for this trace's namespace (they are all alike)."""
    return record_size(layout, trace.requests[0].namespace, 4 * trace.block_size)


def replay_hit_rate(trace: Trace, capacity: int, disk: Path | None) -> float:
    now = [0.0]
    replica = Replica(trace, capacity, now, disk, DISK_FACTOR * HOST_FACTOR * capacity)
    hits = total = 0
    try:
        for r in trace.requests:
            now[0] = r.time_s
            hits += replica.serve(r.namespace, r.tokens, r.ttl_s)
            total += len(r.blocks)
    finally:
        replica.close()
    return hits / total


def replay_restart(trace: Trace, capacity: int, path: Path, restart: bool) -> dict[str, float]:
    """Hit rates in the minute before the trace's midpoint and in the second minute after
    it; with ``restart`` the replica is replaced at the midpoint (its disk kept)."""
    now = [0.0]
    blocks = DISK_FACTOR * HOST_FACTOR * capacity
    replica = Replica(trace, capacity, now, path, blocks)
    mid = trace.requests[len(trace.requests) // 2].time_s
    windows = {"before": (mid - MINUTE, mid), "second_minute_after": (mid + MINUTE,
                                                                      mid + 2 * MINUTE)}
    hits = dict.fromkeys(windows, 0)
    total = dict.fromkeys(windows, 0)
    restarted = False
    try:
        for r in trace.requests:
            if r.time_s > mid + 2 * MINUTE:
                break
            if restart and not restarted and r.time_s >= mid:
                replica.close()
                replica = Replica(trace, capacity, now, path, blocks)
                restarted = True
            now[0] = r.time_s
            got = replica.serve(r.namespace, r.tokens, r.ttl_s)
            for name, (lo, hi) in windows.items():
                if lo <= r.time_s < hi:
                    hits[name] += got
                    total[name] += len(r.blocks)
    finally:
        replica.close()
    return {name: hits[name] / total[name] if total[name] else math.nan for name in windows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="demo (the default) or smollm2")
    ap.add_argument("--reps", type=int, default=smoke(3, 1))
    args = ap.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvgate-disk-bench-") as tmp:
        work = Path(tmp)
        ttft_rows = asyncio.run(measure_ttft(args.model, args.reps, work))
        print_table(ttft_rows, "time to first token: prefix from disk vs recomputed vs host "
                               "tier vs device (ms, median)")
        trace_rows = []
        for name in MOONCAKE:
            trace = load_trace(name)
            for capacity in CAPACITIES:
                without = replay_hit_rate(trace, capacity, None)
                path = work / f"{name}-{capacity}"
                with_disk = replay_hit_rate(trace, capacity, path)
                trace_rows.append({"trace": name, "device_blocks": capacity,
                                   "host_blocks": HOST_FACTOR * capacity,
                                   "disk_blocks": DISK_FACTOR * HOST_FACTOR * capacity,
                                   "hit_rate_without_disk": without,
                                   "hit_rate_with_disk": with_disk})
        print_table(trace_rows, f"Mooncake traces: hit rate without and with a disk tier "
                                f"{DISK_FACTOR}x the host tier")
        trace = load_trace(MOONCAKE[0])
        capacity = CAPACITIES[-1]
        kept = replay_restart(trace, capacity, work / "kept", restart=False)
        again = replay_restart(trace, capacity, work / "restarted", restart=True)
        restart_row = {"trace": MOONCAKE[0], "device_blocks": capacity,
                       "hit_rate_before": again["before"],
                       "hit_rate_second_minute_after": again["second_minute_after"],
                       "never_restarted_same_minute": kept["second_minute_after"],
                       "ratio": again["second_minute_after"] / again["before"]
                       if again["before"] else math.nan}
        print_table([restart_row], "a replica restarted at the trace's midpoint (disk kept): "
                                   "hit rate before vs its second minute after")
    write_result("disk_tier", {
        "ttft": ttft_rows, "traces": trace_rows, "restart": restart_row,
        "notes": ("TTFT: demo model unless --model; the disk is this machine's temporary "
                  "directory (page cache warm: the files were just written). Traces: "
                  "bench.policy's replay, one request at a time, the disk tier's writer "
                  "drained after each request (the trace's clock stands still meanwhile)."),
        "seconds": time.perf_counter() - started,
    })


if __name__ == "__main__":
    main()
