"""What ``bench.load`` adds to the server it starts, and what it reads back from it: the
what-if prelude, the ledger's commit time from ``/metrics`` and, with ``--profile``, the
cProfile statistics of its event loop. (The server itself is ``testkit.ProcessServer``.)"""

from __future__ import annotations

import argparse
import pstats
import re
from pathlib import Path

import aiohttp


def experiment_prelude(args: argparse.Namespace) -> str:
    """Code run in the server process before ``kvgate serve``, for what-if measurements
    only (the gateway itself is unchanged):

    - ``--switch-interval S``: how much overhead is the event loop waiting for the GIL
      while the engine thread runs Python (CPython's default interval is 5 ms)?
    - ``--sqlite-synchronous NORMAL``: how much is the ledger's fsync per group commit
      (WAL with synchronous=NORMAL still survives a killed process, not a power cut)?
    """
    code = ""
    if args.switch_interval:
        code += f"import sys; sys.setswitchinterval({args.switch_interval}); "
    if args.sqlite_synchronous:
        code += ("import kvgate.gateway.ledger.db as _db; _db.SQLITE_PRAGMAS = tuple("
                 "p.replace('synchronous=FULL', "
                 f"'synchronous={args.sqlite_synchronous}') for p in _db.SQLITE_PRAGMAS); ")
    return code


async def ledger_commit_ms(session: aiohttp.ClientSession, url: str,
                           admin_key: str) -> float | None:
    """Mean group-commit time from /metrics (the admin key reads it on the API port): the
    share of overhead the ledger takes."""
    async with session.get(url + "/metrics",
                           headers={"Authorization": f"Bearer {admin_key}"}) as r:
        text = await r.text()
    total = re.search(r"^kvgate_ledger_commit_seconds_sum\S* ([0-9.e+-]+)$", text, re.M)
    count = re.search(r"^kvgate_ledger_commit_seconds_count\S* ([0-9.e+-]+)$", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return round(float(total.group(1)) / float(count.group(1)) * 1000.0, 3)


def print_profile(path: Path, top: int) -> None:
    if not path.exists():
        print("no profile was written (the server did not exit cleanly)")
        return
    print(f"\nserver event loop, top {top} functions by own time (cProfile, main thread):")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)
    print(f"by cumulative time, top {top}:")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top)
