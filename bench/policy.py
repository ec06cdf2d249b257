"""The cache policy against Belady's offline optimum, on a synthetic and two real traces.

Run: ``python -m bench.policy``. Every request is replayed through the real ``CacheStore``
(a tiny page layout, so pages cost nothing; device tier only, no host tier, because the
optimum it is compared with has one tier): match, allocate, commit, release at the
request's arrival time on the store's injected clock, so TTLs expire as they would.

Belady's optimum on the same block sequence evicts the block used farthest in the future
(or does not keep a block at all when that is better). It obeys the same rules as the
store: a hit must extend a hit prefix, a block reused more than its TTL after its last
use is a miss whatever the policy (expiry restarts on every use, hit or not, in both),
and a running request holds all its blocks at once, so only ``capacity - n`` other blocks
survive a request of ``n`` blocks (the store must make room for the whole prompt; an
earlier version let the optimum skip caching the request and keep ``capacity`` others,
which inflated it by up to 10% at 1000 blocks).

Hit rate = blocks served from the cache / full prompt blocks, over all requests.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import print_table, write_result
from cachestore import CacheStore
from cachestore.hashing import block_hashes, root_digest
from kernels.layout import KVLayout

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
CAPACITIES = (1000, 4000, 16000)
DEFAULT_TTL_S = 300.0
NOTE = (
    "Goal ratio >= 0.9 is met at 16000 blocks on every trace and at 4000 on the synthetic one; "
    "it is missed at 1000 blocks everywhere and at 4000 blocks of 512 tokens on Mooncake. "
    "There the cache holds under a minute of traffic while most reuse is a conversation's "
    "next turn after the user's think time (median 18 s after a first turn, 96 s after "
    "later ones, Mooncake conversation). The optimum keeps exactly the turns that will be "
    "followed up and drops the rest, which needs the future: on both Mooncake traces most "
    "blocks are on their first use, and no online feature tried (prompt length, depth, "
    "whether the prompt extended a hit chain) separates the ones reused within the TTL "
    "(0.18 conversation, 0.36 synthetic) from the others. Being asked for twice is the one "
    "usable signal (0.32 and 0.74): the ghost list adds it for blocks already dropped."
)
TRIED = [  # hit rates at 1000 / 4000 blocks, measured with this script's replay
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
]



@dataclass
class Request:
    time_s: float
    namespace: str
    tokens: np.ndarray  # full blocks only: len % block_size == 0
    ttl_s: float
    blocks: list  # one identity per block (chained): what Belady sees


@dataclass
class Trace:
    name: str
    block_size: int
    requests: list[Request]


# -- traces ------------------------------------------------------------------------------
def synthetic_trace(seed: int = 0, duration_s: float = 3600.0, block_size: int = 16) -> Trace:
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
    requests = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            ids = r["hash_ids"][: r["input_length"] // 512]
            if ids:
                requests.append(Request(r["timestamp"] / 1000.0, "tenant:mooncake",
                                        np.asarray(ids, dtype=np.int64), DEFAULT_TTL_S, ids))
    return Trace(path.stem, 1, requests)


# -- replays -----------------------------------------------------------------------------
def replay_store(trace: Trace, capacity: int, shares: bool = True) -> float:
    """Hit rate of the real CacheStore policy at ``capacity`` device blocks (``shares``:
    guaranteed per-tenant shares, as served by default)."""
    layout = KVLayout(1, 1, 1, trace.block_size, torch.float32)
    now = [0.0]
    store = CacheStore(layout, capacity * layout.page_bytes, 0, clock=lambda: now[0],
                       default_ttl_s=DEFAULT_TTL_S, shares=shares)
    hits = total = 0
    for i, r in enumerate(trace.requests):
        now[0] = r.time_s
        n = len(r.blocks)
        total += n
        seq = store.open(str(i), r.namespace, default_ttl_s=r.ttl_s)
        m = store.match(seq, r.tokens)
        if store.allocate(seq, len(r.tokens)):
            hits += m.num_blocks
            store.commit(seq, r.tokens)
        store.release(seq)
    return hits / total


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


def replay_belady(trace: Trace, capacity: int, keys: list, nxt: list[float]) -> float:
    cache: dict = {}  # key -> its next useful access
    heap: list[tuple[float, int, object]] = []  # (-next use, -depth, key), stale entries skipped

    def shrink(limit: int) -> None:
        while len(cache) > limit:
            far, _, victim = heapq.heappop(heap)
            if cache.get(victim) == -far:
                del cache[victim]

    hits = total = pos = 0
    for r in trace.requests:
        n = len(r.blocks)
        total += n
        span = range(pos, pos + n)
        pos += n
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


def main() -> None:
    started = time.perf_counter()
    traces = [synthetic_trace()]
    for name in ("mooncake-conversation.jsonl", "mooncake-synthetic.jsonl"):
        path = TRACES / name
        if path.exists():
            traces.append(mooncake_trace(path))
        else:
            print(f"skipping {name}: not found in {TRACES}")
    results: dict[str, list[dict]] = {}
    for trace in traces:
        keys, nxt = next_uses(trace)
        rows = []
        for capacity in CAPACITIES:
            ours = replay_store(trace, capacity)
            best = replay_belady(trace, capacity, keys, nxt)
            row = {"capacity_blocks": capacity, "hit_rate": round(ours, 4),
                   "belady_hit_rate": round(best, 4),
                   "ratio": round(ours / best, 4) if best else 1.0}
            if len({r.namespace for r in trace.requests}) > 1:  # what the shares cost
                row["hit_rate_without_shares"] = round(
                    replay_store(trace, capacity, shares=False), 4)
            rows.append(row)
        results[trace.name] = rows
        blocks = sum(len(r.blocks) for r in trace.requests)
        print_table(rows, f"{trace.name}: {len(trace.requests)} requests, {blocks} blocks of "
                          f"{trace.block_size if trace.block_size > 1 else 512} tokens")
    synthetic = results.pop("synthetic")
    write_result("policy", {
        "policy": "segmented LRU (reused segment 0.75 of the tier) with a ghost list of the last "
                  "dropped hashes (2x the pages) re-admitting rewritten blocks as reused, deepest "
                  "first, TTL (real CacheStore, device tier only)",
        "notes": NOTE,
        "belady": "farthest next use; same capacity and TTL rules; a running request holds all "
                  "its blocks, so only capacity - n others survive it (fixed here: the optimum "
                  "used to keep capacity others, which inflated it by up to 10% at 1000 blocks)",
        "tried": TRIED,
        "hit_rate": "blocks served from cache / full prompt blocks; on the multi-tenant "
                    "synthetic trace with guaranteed shares (the default) and without",
        "capacities": synthetic,
        "traces": results,
        "seconds": round(time.perf_counter() - started, 1),
    })


if __name__ == "__main__":
    main()
