"""The shared (Valkey) tier: time to first token on a replica that never saw the prefix.

Two engines (same model and weights) share one redis-server started here on a free
loopback port, as an operator would run Valkey. Engine A computes a 2048-token prefix
(written through to Valkey); engine B, whose own tiers are empty, then answers the same
prefix plus a new 32-token suffix. Per rep, a fresh prefix:

- miss_ms: a third engine without a shared tier: every token computed (the baseline:
  what a replica without the shared tier pays);
- shared_ms: B fetching the prefix from Valkey (what the shared tier buys);
- device_ms: A again, the prefix in its own device pages (the ceiling);
- down_ms: B with Valkey killed, after its breaker opened, beside down_miss_ms, the
  engine without a shared tier measured in turn with it (an outage should cost nothing).

The figures of one row are measured interleaved, so load from other work on the machine
falls on all of them alike.

It also measures the cost model's inputs on this machine: ``fetch_block_ms`` (one 16-token
page from Valkey, over loopback, verified) and ``compute_block_ms`` (prefill per block, from
miss_ms), beside the model's predictions (``predicted_*``) from the defaults
(10 Gb/s, 0.5 ms round trip, 5e10 FLOP/s on a CPU). The defaults were set before this run;
the figures here check them, they were not fitted to it.

Run: ``python -m bench.shared_tier [--shapes demo,bench] [--reps 3]``; writes
``bench/results/shared_tier.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bench.common import print_table, smoke, write_result
from bench.ttft import ttft
from kvgate.cachestore.remote_tier import RemoteTierConfig
from kvgate.gateway.engine import EngineConfig
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.loader import load_model
from testkit.redis_server import RedisServer, missing

PREFIX, SUFFIX, BLOCK = smoke(2048, 256), 32, 16


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).tolist()


async def measure(shape: str, reps: int, server: RedisServer) -> dict[str, float]:
    loaded = load_model(EngineConfig(model=shape))
    tier = RemoteTierConfig(url=server.url, timeout_ms=500, breaker_cooldown_s=3600)
    config = EngineConfig(model=shape, device_cache_bytes=512 << 20, host_cache_bytes=0,
                          remote_tier=tier)
    a, b = Engine(config, loaded=loaded), Engine(config, loaded=loaded)
    plain = Engine(EngineConfig(model=shape, device_cache_bytes=512 << 20, host_cache_bytes=0),
                   loaded=loaded)
    for e in (a, b, plain):
        await e.start()
    times: dict[str, list[float]] = {
        k: [] for k in ("miss", "shared", "device", "down", "down_miss", "fetch")}
    suffix = iter(tokens(500 + i, SUFFIX) for i in range(10 * reps + 10))
    try:
        for e in (a, b, plain):
            await ttft(e, "warmup", "warmup", tokens(2, 64))
        for i in range(reps):
            prefix = tokens(1000 + i, PREFIX)
            _, cached = await ttft(a, f"a{i}", "t", prefix + next(suffix))
            assert cached == 0
            assert a.remote is not None and a.remote.tier.drain(60)
            t, cached = await ttft(plain, f"miss{i}", "t", prefix + next(suffix))
            assert cached == 0
            times["miss"].append(t)
            assert b.remote is not None
            start = time.perf_counter()  # the fetch alone (B's own tiers still miss "t")
            fetched = b.store.fetch_remote("t", prefix)
            times["fetch"].append((time.perf_counter() - start) / max(1, PREFIX // BLOCK))
            assert fetched is not None and len(fetched.blocks) == PREFIX // BLOCK
            t, cached = await ttft(b, f"shared{i}", "t", prefix + next(suffix))
            assert cached == PREFIX, cached
            times["shared"].append(t)
            t, cached = await ttft(a, f"dev{i}", "t", prefix + next(suffix))
            assert cached == PREFIX
            times["device"].append(t)
        server.kill()
        for i in range(3):  # the first calls fail and open the breaker
            await ttft(b, f"open{i}", "t-down", tokens(3000 + i, 64))
        assert not b.remote.tier.stats().available
        for i in range(reps):
            prefix = tokens(4000 + i, PREFIX)
            t, cached = await ttft(b, f"down{i}", "t-down", prefix + next(suffix))
            times["down"].append(t)
            t, cached = await ttft(plain, f"dmiss{i}", "t-down", prefix + next(suffix))
            times["down_miss"].append(t)
        cost = b.remote.cost
    finally:
        for e in (a, b, plain):
            await e.stop()
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    blocks = PREFIX // BLOCK
    row = {
        "miss_ms": ms["miss"], "shared_ms": ms["shared"], "device_ms": ms["device"],
        "down_ms": ms["down"], "down_miss_ms": ms["down_miss"],
        "speedup": ms["miss"] / ms["shared"],
        "fetch_block_ms": ms["fetch"], "predicted_fetch_block_ms": cost.fetch_s(1) * 1000,
        "compute_block_ms": ms["miss"] / (blocks + 2),
        "predicted_compute_block_ms": cost.compute_s(0, blocks) / blocks * 1000,
        "page_kib": cost.page_bytes / 1024,
    }
    return {k: round(v, 3) for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=smoke("demo,bench", "demo"))
    parser.add_argument("--reps", type=int, default=smoke(3, 1))
    args = parser.parse_args()
    if missing():
        print(f"bench.shared_tier skipped: {missing()}")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"shared tier, {PREFIX}-token prefix + {SUFFIX}-token suffix, {device}, "
          f"{torch.get_num_threads()} threads, redis-server on loopback")
    results = {}
    for shape in args.shapes.split(","):
        with RedisServer(maxmemory="2gb") as server:
            results[shape] = asyncio.run(measure(shape, args.reps, server))
    rows = [{"model": k, **v} for k, v in results.items()]
    print_table(rows, "time to first token (ms) on a replica that never saw the prefix; "
                      "baseline miss, ceiling device")
    write_result("shared_tier", results)


if __name__ == "__main__":
    main()
