"""The real gateway on a loopback port, started in one of two ways with one vocabulary.

- ``ThreadServer``: ``create_app`` under an aiohttp runner in a thread with its own event
  loop, inside the calling process. It is ready in about a second, and tests can read and
  patch ``server.state`` (engine, ledger); sync SDK clients, async ones and pytest-asyncio
  tests can all talk to it.
- ``ProcessServer``: ``kvgate serve`` as a child process, started as an operator starts
  it. For what only a process shows (signals, SIGKILL, restarts on the same ledger) and
  for benchmarks whose clients must not share the server's GIL; it can run under cProfile
  or after a prelude of code (what-if measurements).

Both take ``(workdir, settings=None, **flags)``: ``flags`` are ``Settings`` fields laid over
``settings`` (default: ``server_settings(workdir)``). Both have ``url``, ``admin`` and
``ledger_rows``, and are context managers that start on entry and stop on exit.
"""

from __future__ import annotations

import abc
import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import requests
from aiohttp import web

from kvgate.gateway import loop
from kvgate.gateway.config import Settings, flat_fields, updated
from testkit.admin import ADMIN_KEY, EVENTS_SECRET, Admin

if TYPE_CHECKING:
    from typing import Self

    from kvgate.gateway.engine import Engine
    from kvgate.gateway.http.state import AppState

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
_BANNER = re.compile(r"serving model '[^']*' on http://[^/\s]+:(\d+)")


def server_settings(workdir: Path, **flags: Any) -> Settings:
    """A test server's settings: loopback, a port the OS picks, the demo model, a SQLite
    ledger in ``workdir``, ``ADMIN_KEY``, small cache pools; ``flags`` override any field."""
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "model": "demo",
        "db": f"sqlite:///{workdir / 'ledger.db'}", "admin_key": ADMIN_KEY,
        "device_cache_bytes": 16 * MiB, "host_cache_bytes": 4 * MiB, "log_level": "warning",
        "events_secret": EVENTS_SECRET,  # signs cache events when a test sets events_url
    }
    return Settings.from_env({}, **{**values, **flags})


class Server(abc.ABC):
    """What both launchers share: settings, address, the admin helper, the ledger file."""

    def __init__(self, workdir: Path | None = None, *, settings: Settings | None = None,
                 **flags: Any) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kvgate-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = settings or server_settings(self.workdir)
        self.settings = updated(base, **flags)
        if not self.settings.ledger.spool_dir and not self.settings.ledger.db.startswith("sqlite:///"):
            # the data directory (spool, receipt key) in the working directory, not the
            # repository's
            self.settings = updated(self.settings, spool_dir=str(self.workdir / "spool"))
        self.port = 0
        self._admin: Admin | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the server is not running; start() it first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> Admin:
        """An ``Admin`` on this server (a new one after a restart on another port)."""
        if self._admin is None or self._admin.url != self.url:
            self._close_admin()
            self._admin = Admin(self.url, self.settings.http.admin_key or ADMIN_KEY)
        return self._admin

    @abc.abstractmethod
    def start(self) -> Self:
        """Returns once the server answers on ``url``."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Idempotent; the working directory (and its ledger) stays for a restart."""

    def close(self) -> None:
        """Stop, and remove the working directory if this server made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ledger_rows(self, tenant_id: int | None = None) -> dict[str, dict[str, Any]]:
        """Usage rows read straight from the SQLite ledger: request_id → row, with ``n``
        the number of rows that request has (1 unless it was billed twice)."""
        if not self.settings.ledger.db.startswith("sqlite:///"):
            raise ValueError(f"ledger_rows reads SQLite ledgers only, not {self.settings.ledger.db}")
        con = sqlite3.connect(self.settings.ledger.db.removeprefix("sqlite:///"))
        con.row_factory = sqlite3.Row
        try:
            sql = ("SELECT request_id, COUNT(*) AS n, MIN(status) AS status, "
                   "MIN(prompt_tokens) AS prompt_tokens, MIN(cached_tokens) AS cached_tokens, "
                   "MIN(cache_write_5m_tokens + cache_write_1h_tokens + cache_write_24h_tokens)"
                   " AS cache_write_tokens, MIN(cache_write_5m_tokens) AS cache_write_5m_tokens, "
                   "MIN(cache_write_1h_tokens) AS cache_write_1h_tokens, "
                   "MIN(cache_write_24h_tokens) AS cache_write_24h_tokens, "
                   "MIN(completion_tokens) AS completion_tokens, MIN(cost_micros) AS cost_micros, "
                   "MIN(reserved_byte_seconds) AS reserved_byte_seconds, "
                   "MIN(stored_token_seconds) AS stored_token_seconds, "
                   "MIN(endpoint) AS endpoint, MIN(cache_key) AS cache_key, "
                   "MIN(started_at) AS started_at, MIN(finished_at) AS finished_at "
                   "FROM usage_events")
            args: tuple[Any, ...] = ()
            if tenant_id is not None:
                sql += " WHERE tenant_id = ?"
                args = (tenant_id,)
            rows = con.execute(sql + " GROUP BY request_id", args).fetchall()
        finally:
            con.close()
        return {r["request_id"]: dict(r) for r in rows}

    def _close_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None


class ThreadServer(Server):
    """The app in this process. ``engine``: one the caller built (e.g. with a patched cache
    store); the server starts it in its own loop and stops it after the app."""

    def __init__(self, workdir: Path | None = None, *, settings: Settings | None = None,
                 engine: Engine | None = None, **flags: Any) -> None:
        if settings is None:  # the engine in this process: tests reach into its objects
            flags.setdefault("api_servers", 0)
        super().__init__(workdir, settings=settings, **flags)
        self.engine = engine
        self.app: web.Application | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def drain_remote(self) -> None:
        """Until the engine's remote tiers (disk, Valkey) have written what they queued."""
        remote = self.state.engine.remote
        assert remote is not None and remote.drain()

    @property
    def state(self) -> AppState:
        from kvgate.gateway.http.state import STATE

        if self.app is None:
            raise RuntimeError("the server is not running; start() it first")
        return self.app[STATE]

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the server's own event loop (e.g. a fault injected into its
        ledger) and return its result."""
        if self._loop is None:
            raise RuntimeError("the server is not running; start() it first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def start(self, timeout_s: float = 120.0) -> Self:
        """Raises what the app raised while starting (e.g. an unmigrated ledger)."""
        from kvgate.gateway.http.app import create_app

        self.app = create_app(self.settings, engine=self.engine)
        self._ready.clear()
        self._error = None
        # the loop ``kvgate serve`` runs with these settings (uvloop unless they say asyncio)
        self._loop = (loop.factory(self.settings.http.event_loop) or asyncio.new_event_loop)()
        self._thread = threading.Thread(target=self._main, name="kvgate-test-server",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the in-process server was not ready in {timeout_s:g}s")
        if self._error is not None:
            self._thread.join(30)
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        self._close_admin()
        if self._thread is None or self._loop is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        self._thread = self._stop = None
        self.port = 0

    def _main(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        assert self.app is not None
        self._stop = asyncio.Event()
        from kvgate.gateway.edge.transport import GatewayRunner

        runner = GatewayRunner(self.app, shutdown_timeout=5)
        try:
            if self.engine is not None:
                await self.engine.start()
            await runner.setup()
            site = web.TCPSite(runner, self.settings.http.host, self.settings.http.port)
            await site.start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            await runner.cleanup()
            if self.engine is not None:
                await self.engine.stop()
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        if self.engine is not None:
            await self.engine.stop()


_ENV_ONLY = ("admin_key", "metrics_key", "shared_tier_secret", "events_secret")


class ProcessServer(Server):
    """``python -m kvgate.gateway.cli serve`` with every setting as a flag (the admin key in
    ``KVGATE_ADMIN_KEY``, as an operator passes it). ``profile``: run it under cProfile;
    the statistics are in ``profile_path`` once it stopped cleanly. ``prelude``: Python code
    the process runs before ``kvgate serve``. Its output goes to ``server-<n>.log`` in the
    working directory, one file per start."""

    def __init__(self, workdir: Path | None = None, *, settings: Settings | None = None,
                 profile: bool = False, prelude: str = "", **flags: Any) -> None:
        super().__init__(workdir, settings=settings, **flags)
        self.profile_path: Path | None = self.workdir / "server.prof" if profile else None
        self.prelude = prelude
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def command(self) -> list[str]:
        cmd = [sys.executable]
        if self.profile_path is not None:
            cmd += ["-m", "cProfile", "-o", str(self.profile_path)]
        if self.prelude:  # a script file, so cProfile can run it too
            script = self.workdir / "serve.py"
            script.write_text(f"import sys\n{self.prelude}\n"
                              "from kvgate.gateway.cli import main\nsys.exit(main())\n")
            cmd += [str(script)]
        else:
            cmd += ["-m", "kvgate.gateway.cli"]
        cmd.append("serve")
        for section, field in flat_fields(Settings):
            value = getattr(getattr(self.settings, section), field.name)
            if field.name in _ENV_ONLY or value is None:
                continue
            if isinstance(value, bool):
                value = int(value)
            cmd += ["--" + field.name.replace("_", "-"), str(value)]
        return cmd

    def start(self, timeout_s: float = 180.0) -> Self:
        """Returns once ``/readyz`` answers 200; raises with the log's tail if the process
        exits or is not ready in time."""
        self.starts += 1
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        where = {f.name: section for section, f in flat_fields(Settings)}
        for name in _ENV_ONLY:  # secrets: environment only, as an operator passes them
            value = getattr(getattr(self.settings, where[name]), name)
            if value:
                env["KVGATE_" + name.upper()] = value
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvgate serve exited with {self.proc.returncode}:\n"
                                   + self.log()[-4000:])
            if not self.port and (m := _BANNER.search(self.log())):
                self.port = int(m.group(1))
            if self.port and self._ready():
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"kvgate serve was not ready in {timeout_s:g}s:\n"
                           + self.log()[-4000:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM: in-flight requests drain, as in production; SIGKILL after the timeout."""
        self._close_admin()
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.port = 0

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup; what the ledger holds is what a crash leaves."""
        self._close_admin()
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.port = 0

    def _ready(self) -> bool:
        try:
            return requests.get(self.url + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False
