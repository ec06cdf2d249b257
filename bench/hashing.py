"""How long hashing one 128k-token prompt into chained block hashes takes (goal ≤ 2 ms).

Run: ``python -m bench.hashing``. Median of many runs, input as a numpy array (what the
engine holds after tokenising) and as a Python list, block size 16.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.common import print_table, smoke, write_result
from kvgate.cachestore.hashing import block_hashes, root_digest

TOKENS = smoke(131072, 4096)
BLOCK_SIZE = 16
RUNS = smoke(200, 5)


def time_ms(fn, runs: int = RUNS) -> list[float]:
    fn()  # warm up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    root = root_digest("demo", "", "tenant:1")
    ids = np.random.default_rng(0).integers(0, 128_256, TOKENS, dtype=np.int64)
    as_list = ids.tolist()
    rows = []
    for name, tokens in (("numpy int64", ids), ("python list", as_list)):
        ms = time_ms(lambda tokens=tokens: block_hashes(root, tokens, BLOCK_SIZE))
        rows.append({"input": name, "tokens": TOKENS, "blocks": TOKENS // BLOCK_SIZE,
                     "ms_median": statistics.median(ms), "ms_p10": np.percentile(ms, 10),
                     "ms_p90": np.percentile(ms, 90)})
    print_table(rows, f"chained xxh3_128 block hashes, block size {BLOCK_SIZE}, {RUNS} runs")
    write_result("hashing", {
        "tokens": TOKENS,
        "block_size": BLOCK_SIZE,
        "ms_median": round(rows[0]["ms_median"], 4),
        "ms_median_from_list": round(rows[1]["ms_median"], 4),
        "goal_ms": 2.0,
        "runs": RUNS,
    })


if __name__ == "__main__":
    main()
