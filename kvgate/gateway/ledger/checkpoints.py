"""Usage checkpoints: what a running request has delivered so far, durable, so a crash
cannot leave delivered output unbilled.

One journal per process, ``checkpoints-<host>-<pid>-<n>-<random>.journal`` in the spool
directory, ``flock``ed, in the spool's framing (``<crc32> <length> <json>``: a torn last
line fails its checksum). All changed requests go in one fsync'd write at least every
``interval_s``, as soon as a request has its first token (its prompt is then billable),
and whenever one request has made ``every_tokens`` more output tokens; a
billed request appends a ``done`` line (not fsync'd). On start, journals whose process is
gone (their lock is free) are read, each request with no ``done`` is billed from its last
checkpoint with status ``interrupted``, and the file is removed. Why this bills a request
once: docs/architecture.md, "Ledger".
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import socket
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .billing import UsageEvent
from .spool import SpoolRecord

log = logging.getLogger("kvgate.ledger")

_PATTERN = "checkpoints-*.journal"
_COMPACT_BYTES = 1 << 20  # rewrite the journal with only live requests past this size
_MIN_GAP_S = 0.05  # flushes woken by token counts come at most this often
_names = itertools.count()

Snapshot = Callable[[], UsageEvent | None]  # the request's usage so far (None: nothing yet)


def _line(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %d " % (zlib.crc32(data), len(data)) + data + b"\n"


def read_journal(data: bytes) -> dict[str, UsageEvent]:
    """The last checkpoint of every request the journal leaves unfinished."""
    open_: dict[str, UsageEvent] = {}
    for raw in data.split(b"\n"):
        try:
            crc, length, payload = raw.split(b" ", 2)
            if int(length) != len(payload) or int(crc, 16) != zlib.crc32(payload):
                continue  # a torn or damaged line: skipped
            d = json.loads(payload)
            if d.get("done"):
                open_.pop(str(d["request_id"]), None)
            else:
                ev = SpoolRecord.from_json(d).event
                open_[ev.request_id] = ev
        except Exception:  # one bad line never hides the others
            continue
    return open_


class Checkpoints:
    def __init__(self, directory: str | Path, interval_s: float = 1.0,
                 every_tokens: int = 64) -> None:
        self.directory = Path(directory)
        self.interval_s = interval_s
        self.every_tokens = every_tokens
        self.flushes = 0
        self.errors = 0
        self._tracked: dict[str, Snapshot] = {}
        self._written: dict[str, int] = {}  # request id -> output tokens checkpointed
        self._latest: dict[str, bytes] = {}  # request id -> its last checkpoint line
        # Requests whose bill failed: billed from their line at the next start, so a
        # compaction keeps it and a clean stop keeps the file
        self._unbilled: dict[str, bytes] = {}
        self._done: list[bytes] = []
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
        self._adopted: list[Path] = []

    # -- start and stop -------------------------------------------------------------------

    async def recover(self) -> list[UsageEvent]:
        """Requests that journals of dead processes leave unfinished, as ``interrupted``
        events to bill (then ``forget_recovered``); starts the flush loop."""
        loop = asyncio.get_running_loop()
        events = await loop.run_in_executor(self._pool, self._adopt)
        self._task = asyncio.create_task(self._run())
        return events

    def _adopt(self) -> list[UsageEvent]:
        out: list[UsageEvent] = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob(_PATTERN)):
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live process's journal
                try:  # still the file the name holds (not one a compaction replaced)?
                    if os.fstat(fd).st_ino != os.stat(path).st_ino:
                        continue
                except OSError:
                    continue
                with open(path, "rb") as f:
                    found = read_journal(f.read())
            finally:
                os.close(fd)
            out.extend(found.values())  # checkpoints say interrupted; a final line its own
            self._adopted.append(path)
        if out:
            log.warning("billing %d %s a stopped process left unfinished, as interrupted "
                        "(from the last usage checkpoints)", len(out),
                        "request" if len(out) == 1 else "requests")
        return out

    def forget_recovered(self) -> None:
        """The recovered requests are billed: their journals go."""
        for path in self._adopted:
            with contextlib.suppress(OSError):
                path.unlink()
        self._adopted = []

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.get_running_loop().run_in_executor(self._pool, self._close_file)
        self._pool.shutdown(wait=True)

    def _close_file(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if not self._tracked and not self._unbilled and self._path is not None:
            # nothing left to recover
            with contextlib.suppress(OSError):
                self._path.unlink()

    # -- the request side (event loop, cheap) ----------------------------------------------

    def track(self, request_id: str, snapshot: Snapshot) -> None:
        """A request whose first token is on its way: its first checkpoint (the prompt,
        the bulk of most bills) goes with the next flush, due now, not after the interval:
        a crash in a stream's first second would otherwise leave it unbilled whole."""
        self._tracked[request_id] = snapshot
        self._wake.set()

    def advanced(self, request_id: str, completion_tokens: int) -> None:
        """A request has made ``completion_tokens`` in all: a flush is due once it is
        ``every_tokens`` past its last checkpoint."""
        if completion_tokens - self._written.get(request_id, 0) >= self.every_tokens:
            self._wake.set()

    def finish(self, request_id: str, billed: bool = True,
               final: UsageEvent | None = None) -> None:
        """The request is billed durably (``billed``), or is not: its bill failed, or
        lives in memory only (the spool's disk failed). Then ``final``, its whole usage,
        replaces its checkpoint (written with the next flush), and the next start bills
        that, with its own status. Either way it is no longer tracked."""
        self._tracked.pop(request_id, None)
        line = self._latest.pop(request_id, None)
        if billed:
            if self._written.pop(request_id, None) is not None:
                self._done.append(_line({"done": True, "request_id": request_id}))
            return
        self._written.pop(request_id, None)
        if final is not None:
            line = _line(SpoolRecord(final, None).to_json())
            self._done.append(line)
            self._wake.set()
        if line is not None:
            self._unbilled[request_id] = line

    # -- flushing ----------------------------------------------------------------------------

    async def _run(self) -> None:
        failing = 0  # flushes failed in a row: logged once, then retried ever more slowly
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                self.errors += 1
                failing += 1
                if failing == 1:
                    log.error("usage checkpoints cannot be written in %s (%s): a crash now "
                              "would leave running requests unbilled; retrying", self.directory,
                              exc)
                await asyncio.sleep(min(30.0, self.interval_s * 2 ** min(failing, 5)))
                continue
            if failing:
                log.warning("usage checkpoints written again after %d failed tries", failing)
                failing = 0
            await asyncio.sleep(_MIN_GAP_S)

    async def flush(self) -> int:
        """Writes every request whose usage moved since its last checkpoint, and the lines
        ``finish`` queued; how many checkpoints."""
        lines: list[bytes] = []
        marks: dict[str, int] = {}
        now = datetime.now(UTC)
        for rid, snapshot in list(self._tracked.items()):
            ev = snapshot()
            if ev is None or ev.usage.completion_tokens == self._written.get(rid, -1):
                continue
            line = _line(SpoolRecord(replace(ev, finished_at=now), None).to_json())
            lines.append(line)
            marks[rid] = ev.usage.completion_tokens
            self._latest[rid] = line
        done, self._done = self._done, []
        if not lines and not done:
            return 0
        compact = self._size > _COMPACT_BYTES
        live = [*self._latest.values(), *self._unbilled.values()] if compact else []
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, self._write, b"".join(done + lines), compact, b"".join(live))
        except BaseException:
            self._done = done + self._done
            raise
        self._written.update(marks)
        self.flushes += 1
        return len(lines)

    def _write(self, data: bytes, compact: bool, live: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if compact and self._path is not None and self._fd is not None:
            tmp = self._path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                view = memoryview(live)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.replace(tmp, self._path)
            os.close(self._fd)
            self._fd, self._size = fd, len(live)
            return
        if self._fd is None:
            # A name no other process can hold: replicas sharing a volume may all be pid 1
            name = (f"checkpoints-{socket.gethostname()[:40]}-{os.getpid()}-{next(_names)}-"
                    f"{secrets.token_hex(6)}.journal")
            path = self.directory / name.replace("/", "_")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            self._fd, self._path, self._size = fd, path, 0
        start = self._size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # no torn line for the next append to join
                os.ftruncate(self._fd, start)
            raise
        self._size = start + len(data)
