"""The server ``bench/load.py`` starts when it is given no ``--url``, and what the bench
reads back from it: the ledger's commit time from ``/metrics`` and, with ``--profile``,
the cProfile statistics of its event loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


# -- the server this script starts when no --url is given ----------------------------------


class OwnServer:
    def __init__(self, args: argparse.Namespace, admin_key: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="kvgate-load-")
        self.log = Path(self.tmp.name) / "server.log"
        self.prof = Path(self.tmp.name) / "server.prof"
        cmd = [sys.executable]
        if args.profile:
            cmd += ["-m", "cProfile", "-o", str(self.prof)]
        prelude = experiment_prelude(args)
        if prelude:  # a script file, so cProfile can run it too
            script = Path(self.tmp.name) / "serve.py"
            script.write_text(f"{prelude}\nfrom gateway.cli import main\nsys.exit(main())\n")
            cmd += [str(script)]
        else:
            cmd += ["-m", "gateway.cli"]
        cmd += ["serve", "--port", "0",
                "--db", f"sqlite:///{self.tmp.name}/load.db",
                "--device-cache-bytes", str(args.device_cache_bytes),
                "--host-cache-bytes", str(args.host_cache_bytes),
                "--max-queue", "1024"]
        env = {**os.environ, "KVGATE_ADMIN_KEY": admin_key, "KVGATE_LOG_LEVEL": "warning",
               "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.url = ""

    async def ready(self, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"kvgate serve exited:\n{self.log.read_text()[-3000:]}")
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="ignore"))
                if m:
                    self.url = m.group(1)
                    try:
                        async with s.get(self.url + "/readyz") as r:
                            if r.status == 200:
                                return self.url
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.2)
        raise SystemExit("kvgate serve was not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def experiment_prelude(args: argparse.Namespace) -> str:
    """Code run in the server process before ``kvgate serve``, for what-if measurements
    only (the gateway itself is unchanged):

    - ``--switch-interval S``: how much overhead is the event loop waiting for the GIL
      while the engine thread runs Python (CPython's default interval is 5 ms)?
    - ``--sqlite-synchronous NORMAL``: how much is the ledger's fsync per group commit
      (WAL with synchronous=NORMAL still survives a killed process, not a power cut)?
    """
    code = "import sys; "
    if args.switch_interval:
        code += f"sys.setswitchinterval({args.switch_interval}); "
    if args.sqlite_synchronous:
        code += ("import gateway.ledger.db as _db; _db.SQLITE_PRAGMAS = tuple("
                 "p.replace('synchronous=FULL', "
                 f"'synchronous={args.sqlite_synchronous}') for p in _db.SQLITE_PRAGMAS); ")
    return code if code != "import sys; " else ""


async def ledger_commit_ms(session: aiohttp.ClientSession, url: str) -> float | None:
    """Mean group-commit time from /metrics: the share of overhead the ledger takes."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    total = re.search(r"^kvgate_ledger_commit_seconds_sum\S* ([0-9.e+-]+)$", text, re.M)
    count = re.search(r"^kvgate_ledger_commit_seconds_count\S* ([0-9.e+-]+)$", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return round(float(total.group(1)) / float(count.group(1)) * 1000.0, 3)


def print_profile(path: Path, top: int) -> None:
    import pstats

    if not path.exists():
        print("no profile was written (the server did not exit cleanly)")
        return
    print(f"\nserver event loop, top {top} functions by own time (cProfile, main thread):")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(top)
    print(f"by cumulative time, top {top}:")
    pstats.Stats(str(path)).sort_stats("cumulative").print_stats(top)
