"""Every benchmark in ``bench/`` runs, at its smoke size, so a refactor cannot break one
unnoticed.

Each bench runs as a user runs it (``python -m bench.<name>`` from the repository root) with
``KVGATE_BENCH_SMOKE=1``: tiny sizes, a few seconds each, and nothing written to
``bench/results/`` (whose files must come out of the run untouched). Its figures mean
nothing and nothing here looks at them. A bench that drives a tool this machine lacks
(redis-server, PostgreSQL, Chromium) skips saying why, and fails in CI. The selected benches
run two at a time (most are one process on one core), started once for the module; each
test waits for its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.ci import cannot_run

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# Modules of bench/ that are not benchmarks: shared code only, nothing to run.
NOT_BENCHES = {"__init__", "common", "load_server"}
TIMEOUT_S = 300
PARALLEL = 2  # benches run at once
NOT_WRITTEN = "figures not written"  # what bench.common.write_result prints under smoke


# Modes of a bench that run other code than its default (module and arguments).
MODES = ["cluster --sweep", "cluster --overhead"]


def benches() -> list[str]:
    return sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHES)


# -- what some benches need besides Python -----------------------------------------------------

def _redis() -> str | None:
    from testkit.redis_server import missing

    return missing()


def _postgres() -> str | None:
    import asyncpg

    from bench.cluster import PG_URL

    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {PG_URL} unreachable: {exc!r}"
    return None


def _chromium() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    from testkit.browser import find_chromium

    if find_chromium() is None:
        return ("no Chromium found (Debian: apt-get install chromium; or set "
                "KVGATE_TEST_CHROMIUM to a Chromium or Chrome binary)")
    return None


NEEDS: dict[str, list[Callable[[], str | None]]] = {
    "cluster": [_redis, _postgres],
    "console": [_chromium],
    "shared_tier": [_redis],
}


# -- the tests ---------------------------------------------------------------------------------

def _results() -> dict[str, tuple[int, str]]:
    """Every file under bench/results/: its modification time and a digest of its bytes."""
    if not RESULTS.exists():
        return {}
    return {str(p.relative_to(RESULTS)): (p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(RESULTS.rglob("*")) if p.is_file()}


@dataclass
class Run:
    returncode: int | None  # None: killed at TIMEOUT_S
    out: str
    err: str


@dataclass
class Smoke:
    before: dict[str, tuple[int, str]]  # bench/results/ before the first bench started
    skipped: dict[str, str]  # bench -> why it cannot run here
    runs: dict[str, Future[Run]]


def _run(name: str, procs: list[subprocess.Popen[str]]) -> Run:
    env = {**os.environ, "KVGATE_BENCH_SMOKE": "1", "PYTHONUNBUFFERED": "1"}
    # A session of its own, so a bench that hangs goes with every process it started.
    module, *args = name.split()
    proc = subprocess.Popen([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    procs.append(proc)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Run(None, out, err)
    return Run(proc.returncode, out, err)


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest) -> Iterator[Smoke]:
    """Starts every selected bench that can run here, ``PARALLEL`` at a time."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_bench_runs_at_smoke_size"]
    skipped = {}
    for name in selected:
        for need in NEEDS.get(name.split()[0], []):
            if reason := need():
                skipped[name] = reason
                break
    smoke = Smoke(_results(), skipped, {})
    procs: list[subprocess.Popen[str]] = []
    pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="bench-smoke")
    smoke.runs = {name: pool.submit(_run, name, procs) for name in selected
                  if name not in skipped}
    try:
        yield smoke
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # an interrupted session leaves no bench running
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pool.shutdown(wait=True)


def test_the_benches_are_found() -> None:
    found = benches()
    assert found, f"no bench modules found in {BENCH}"
    assert {"hashing", "ttft", "policy"} <= set(found), found
    missing = {name for name in NOT_BENCHES | {m.split()[0] for m in MODES}
               if not (BENCH / f"{name}.py").exists()}
    assert not missing, f"NOT_BENCHES names modules that are gone: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", benches() + MODES)
def test_bench_runs_at_smoke_size(name: str, smoke_runs: Smoke) -> None:
    if name in smoke_runs.skipped:
        cannot_run(f"bench.{name}: {smoke_runs.skipped[name]}")
    run = smoke_runs.runs[name].result()
    out, err = run.out, run.err
    if run.returncode is None:
        pytest.fail(f"bench.{name} ran past {TIMEOUT_S} s at smoke size\n"
                    f"--- stdout (tail) ---\n{out[-3000:]}\n--- stderr (tail) ---\n{err[-3000:]}")
    assert run.returncode == 0, (
        f"bench.{name} exited with {run.returncode}\n--- stdout (tail) ---\n{out[-2000:]}\n"
        f"--- stderr (tail) ---\n{err[-5000:]}")
    assert NOT_WRITTEN in out, (
        f"bench.{name} exited 0 without reaching bench.common.write_result (skipped? a "
        f"helper module to add to NOT_BENCHES?)\n--- stdout (tail) ---\n{out[-3000:]}")
    after = _results()
    before = smoke_runs.before
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    assert not changed, f"a bench wrote to bench/results/ in a smoke run: {changed}"
