"""The usage spool: where usage events wait, durable, while the database cannot take them.

One append-only file per process, ``usage-<n>.spool`` in the spool directory, ``flock``ed
for the process's life. Each line is one event::

    <crc32 of payload, 8 hex digits> <payload length> <payload: one JSON object>\\n

``append`` returns after the write and its fsync; a failed append is cut back to the last
whole record (``_size``) before anything else is written. ``read`` cuts a torn tail and
skips (and logs) a damaged line; ``drop`` removes the replayed prefix. ``error`` says why
the last disk operation failed, ``probe`` re-tests the disk. All file work runs on one
thread, through one ``DiskOps`` (a failing disk in tests). Files of processes that are gone
are adopted on open. Why each rule: docs/architecture.md, "Ledger".
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kvgate.gateway.usage import CacheDetail, Usage

from .billing import Billed, PlanPrices, Prices, UsageEvent
from .db import sqlite_path

log = logging.getLogger("kvgate.ledger")

DEFAULT_MAX_EVENTS = 10_000
_PATTERN = "usage-*.spool"


def default_spool_dir(url: str) -> Path:
    """Beside a SQLite file (``<file>-spool``, like its ``-wal``), else ``./kvgate-spool``."""
    path = sqlite_path(url)
    if path is not None:
        return Path(path + "-spool")
    return Path("kvgate-spool")


@dataclass(frozen=True)
class SpoolRecord:
    """A spooled event and, when the tenant's prices were known, the cost it was answered
    with and the plan it was priced by (replay stores that cost, and the receipt states
    that plan; without one, replay prices it at commit)."""

    event: UsageEvent
    billed: Billed | None
    plan: PlanPrices | None = None

    def to_json(self) -> dict[str, Any]:
        e = self.event
        return {"request_id": e.request_id, "tenant_id": e.tenant_id, "key_id": e.key_id,
                "model": e.model, "endpoint": e.endpoint, "usage": e.usage.to_json(),
                "status": e.status, "started_at": e.started_at.isoformat(),
                "finished_at": e.finished_at.isoformat(), "ttft_ms": e.ttft_ms, "cache_key": e.cache_key,
                "cost_micros": None if self.billed is None else self.billed.cost_micros,
                "currency": None if self.billed is None else self.billed.currency,
                "receipt_id": e.receipt_id, "cache": e.cache.to_json(),
                "plan": None if self.plan is None else {
                    "id": self.plan.plan_id, "name": self.plan.name,
                    "currency": self.plan.currency, "prices": asdict(self.plan.prices)}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpoolRecord:
        event = UsageEvent(
            request_id=d["request_id"], tenant_id=d["tenant_id"], key_id=d["key_id"],
            model=d["model"], endpoint=d["endpoint"], usage=Usage.from_json(d["usage"]),
            status=d["status"], started_at=datetime.fromisoformat(d["started_at"]),
            finished_at=datetime.fromisoformat(d["finished_at"]), ttft_ms=d["ttft_ms"],
            receipt_id=d.get("receipt_id"), cache=CacheDetail.from_json(d.get("cache") or {}),
            cache_key=d.get("cache_key"))
        event.validate()
        billed = None
        if d.get("cost_micros") is not None:
            billed = Billed(new=True, cost_micros=int(d["cost_micros"]),
                            currency=str(d["currency"]), spooled=True)
        plan = None
        if billed is not None and isinstance(d.get("plan"), dict):
            p = d["plan"]
            plan = PlanPrices(Prices(**p["prices"]), str(p["currency"]), p["id"], p["name"])
        return cls(event, billed, plan)


def encode(record: SpoolRecord) -> bytes:
    payload = json.dumps(record.to_json(), separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %d " % (zlib.crc32(payload), len(payload)) + payload + b"\n"


def decode(data: bytes, name: str = "spool") -> tuple[list[SpoolRecord], int]:
    """The records of ``data`` and the offset just past the last whole line: what follows
    it is a torn tail for the caller to cut (bytes after the last newline, or a last line
    whose length or checksum fails, as an interrupted append leaves). A damaged line with
    whole lines after it is skipped (and logged with its bytes); so is a line whose
    checksum holds but whose event does not load."""
    records: list[SpoolRecord] = []
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        start, pos = pos, end + 1
        try:
            crc, length, payload = line.split(b" ", 2)
            intact = int(length) == len(payload) and int(crc, 16) == zlib.crc32(payload)
        except ValueError:
            intact = False
        try:
            if not intact:
                if data.find(b"\n", pos) < 0:  # the last line: torn, not skipped
                    log.error("%s: a torn last line at byte %d, to be cut: %r",
                              name, start, line[:8192])
                    return records, start
                raise ValueError("length or checksum mismatch")
            records.append(SpoolRecord.from_json(json.loads(payload)))
        except Exception as exc:
            # Its bytes go to the log, so an operator can still recover the event by hand.
            log.error("%s: skipping a damaged line ending at byte %d: %s; the line: %r",
                      name, pos, exc, line[:8192])
    return records, pos


class DiskOps:
    """Every write, fsync and truncation the spool makes: the operating system's calls,
    in one object a test replaces with a failing disk."""

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)


_PROBE_BYTES = 4096  # what ``probe`` writes: about a few records' worth


class Spool:
    """The process's spool file; every method that touches the disk is a coroutine run on
    the spool's own thread. ``depth`` is the number of events in the file; ``error`` why
    the last append, probe or adoption failed (None once an append or probe succeeds)."""

    def __init__(self, directory: str | Path, max_events: int = DEFAULT_MAX_EVENTS,
                 ops: DiskOps | None = None) -> None:
        self.directory = Path(directory)
        self.max_events = max_events
        self.ops = ops or DiskOps()
        self.depth = 0
        self.error: str | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # the file's whole records end here; nothing past it is read
        self._torn = False  # bytes past ``_size`` that a failed cut left: cut before writing
        self._adopt = False  # an adoption the disk refused: retried by ``probe``
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-spool")

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def healthy(self) -> bool:
        """Appends work and nothing waits for ``probe`` (an adoption the disk refused)."""
        return self.error is None and not self._adopt

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _disk(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn`` on the spool thread; its ``OSError`` is the spool's ``error`` until a
        later append or probe succeeds."""
        try:
            result = await self._call(fn, *args)
        except OSError as exc:
            self.error = f"cannot {what} the usage spool in {self.directory}: {exc}"
            raise
        self.error = None
        return result

    async def open(self) -> None:
        """Adopt what dead processes left (and cut a torn tail); creates nothing when
        there is nothing to adopt. Raises ``OSError`` when the directory cannot be used at
        all; an adoption the disk refuses only sets ``error`` (``probe`` retries it)."""
        await self._call(self._open)

    async def append(self, records: list[SpoolRecord]) -> None:
        """Durable on return (written and fsync'd). On ``OSError`` nothing of ``records``
        stays in the file: it is cut back to its whole records (or, should that cut fail
        too, before the next append and never read past them)."""
        await self._disk("write", self._append, records)

    async def probe(self) -> None:
        """Re-test the disk: cut what a failed cut left, retry a refused adoption, write and
        fsync a small file beside the spool's and remove it. Clears ``error``, or raises
        ``OSError`` and sets it."""
        await self._disk("write", self._probe)

    async def read(self) -> tuple[list[SpoolRecord], int]:
        """Every event in the file now, and the offset just past them."""
        result: tuple[list[SpoolRecord], int] = await self._call(self._read)
        return result

    async def drop(self, offset: int, count: int) -> None:
        """Forget the first ``offset`` bytes (``count`` events), replayed."""
        await self._call(self._drop, offset, count)

    async def close(self) -> None:
        await self._call(self._close)
        self._pool.shutdown(wait=True)

    # -- on the spool thread -----------------------------------------------------------

    def _claim(self) -> int:
        """This process's file: the first one no live process holds (with what a process
        that is gone left in it, its torn tail cut), created when there is none."""
        if self._fd is not None:
            return self._fd
        self.directory.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            path = self.directory / f"usage-{n}.spool"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            if not _lock(fd, path):
                os.close(fd)
                n += 1
                continue
            try:
                _fsync_dir(self.ops, self.directory)
                records, end = decode(_read_all(fd), str(path))
            except BaseException:
                os.close(fd)  # its lock goes with it: the next claim takes it again
                raise
            self._fd, self._path = fd, path
            self._size, self.depth = end, len(records)
            if os.fstat(fd).st_size != end:
                log.warning("%s: cutting a torn tail (%d bytes)", path,
                            os.fstat(fd).st_size - end)
                self._torn = True
                self._cut(fd, strict=False)
            return fd

    def _cut(self, fd: int, *, strict: bool) -> None:
        """The file back to its whole records (``_size``), when a failed append or cut left
        more. ``strict``: raise when it cannot be cut (before an append); else log it and
        leave ``_torn`` for the next try (nothing past ``_size`` is read meanwhile)."""
        if not self._torn:
            return
        try:
            self.ops.truncate(fd, self._size)
            self.ops.fsync(fd)
        except OSError as exc:
            if strict:
                raise
            log.error("%s: cannot cut the file back to its %d bytes of whole records (%s); "
                      "nothing past them is read, and they are cut before the next append",
                      self._path, self._size, exc)
            return
        self._torn = False

    def _write_records(self, fd: int, data: bytes) -> None:
        """Append ``data`` (whole records) and fsync, or leave the file as it was."""
        self._cut(fd, strict=True)
        try:
            _write_all(self.ops, fd, data)
            self.ops.fsync(fd)
        except OSError:
            self._torn = True  # whatever reached the file past ``_size`` is not a record
            self._cut(fd, strict=False)
            raise
        self._size += len(data)

    def _open(self) -> None:
        if not self.directory.is_dir() or not any(self.directory.glob(_PATTERN)):
            return
        self._claim()
        self._adopt = True
        try:
            self._adopt_others()
        except OSError as exc:
            # Serve anyway: the files stay where they are, ``probe`` retries.
            self.error = f"cannot adopt spooled usage in {self.directory}: {exc}"
            log.error("%s", self.error)

    def _adopt_others(self) -> None:
        own = self._claim()
        for other in sorted(self.directory.glob(_PATTERN)):
            if other == self._path:
                continue
            fd = os.open(other, os.O_RDWR)
            try:
                if not _lock(fd, other):
                    continue  # a live process's own
                records, _ = decode(_read_all(fd), str(other))
                if records:
                    self._write_records(own, b"".join(encode(r) for r in records))
                    self.depth += len(records)
                    log.warning("adopted %d spooled usage events from %s", len(records), other)
                other.unlink()  # a crash before this: adopted twice, billed once (by id)
                _fsync_dir(self.ops, self.directory)
            finally:
                os.close(fd)
        self._adopt = False

    def _append(self, records: list[SpoolRecord]) -> None:
        fd = self._claim()
        self._write_records(fd, b"".join(encode(r) for r in records))
        self.depth += len(records)

    def _probe(self) -> None:
        if self._fd is not None:
            self._cut(self._fd, strict=True)
        if self._adopt:
            self._adopt_others()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"probe-{os.getpid()}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(self.ops, fd, bytes(_PROBE_BYTES))
            self.ops.fsync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def _read(self) -> tuple[list[SpoolRecord], int]:
        if self._fd is None:
            return [], 0
        self._cut(self._fd, strict=False)
        data = _read_all(self._fd)[:self._size]
        records, end = decode(data, str(self._path))
        if end != self._size:  # a damaged last line (whatever damaged it): cut, logged
            self._size, self._torn = end, True
            self._cut(self._fd, strict=False)
        return records, end

    def _drop(self, offset: int, count: int) -> None:
        if self._fd is None or self._path is None or offset == 0:
            return
        self._cut(self._fd, strict=False)
        if offset >= self._size:  # nothing appended since the read: empty it in place
            self.ops.truncate(self._fd, 0)
            self._size, self._torn, self.depth = 0, False, 0
            try:
                self.ops.fsync(self._fd)
            except OSError as exc:  # replayed already: a crash brings back only duplicates
                log.warning("%s: emptied, not yet fsync'd: %s", self._path, exc)
            return
        rest = os.pread(self._fd, self._size - offset, offset)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(self.ops, fd, rest)
            self.ops.fsync(fd)
            os.replace(tmp, self._path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(self._fd)  # its lock goes with it; the new file is locked already
        self._fd, self._size, self._torn = fd, len(rest), False
        self.depth = rest.count(b"\n")
        try:
            _fsync_dir(self.ops, self.directory)
        except OSError as exc:  # a crash may bring back the old file: duplicates only
            log.warning("%s: replaced, the directory not yet fsync'd: %s", self._path, exc)

    def _close(self) -> None:
        if self._fd is not None:
            self._cut(self._fd, strict=False)
            empty = os.fstat(self._fd).st_size == 0
            if empty and self._path is not None:
                self._path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _lock(fd: int, path: Path) -> bool:
    """An exclusive lock on the file ``path`` names now (not on one replaced meanwhile)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(ops: DiskOps, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[ops.write(fd, view):]


def _fsync_dir(ops: DiskOps, directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        ops.fsync(fd)
    finally:
        os.close(fd)
