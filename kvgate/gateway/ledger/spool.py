"""The usage spool: where usage events wait, durable, while the database cannot take them.

One append-only file per process, ``usage-<n>.spool`` in the spool directory, held with an
exclusive ``flock`` for the process's life (so replicas sharing a directory never share a
file). Each line is one event::

    <crc32 of payload, 8 hex digits> <payload length> <payload: one JSON object>\\n

Appends are written and fsync'd before ``record`` answers. A torn last line (a crash in the
middle of an append) fails its length or checksum and is cut off when the file is next
opened; a damaged line elsewhere is skipped and logged with its bytes, never the lines
around it.

Replay reads the file, commits its events (the insert is idempotent by request id, so an
event committed before a crash that kept it in the spool is not billed twice), then drops
the replayed prefix: the bytes after it (appended meanwhile) are copied to a new file that
is renamed over the old one. All file work runs on one thread, in submission order.

Nothing is created until the first event is spooled. On open, files of processes that are
gone (their lock is free) are adopted: their events are appended to this process's own
file, then they are removed.
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
    """The records of ``data`` and the offset just past the last complete line. A damaged
    complete line is skipped (and logged); an incomplete last line is not counted."""
    records: list[SpoolRecord] = []
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        pos = end + 1
        try:
            crc, length, payload = line.split(b" ", 2)
            if int(length) != len(payload) or int(crc, 16) != zlib.crc32(payload):
                raise ValueError("length or checksum mismatch")
            records.append(SpoolRecord.from_json(json.loads(payload)))
        except Exception as exc:
            # Its bytes go to the log, so an operator can still recover the event by hand.
            log.error("%s: skipping a damaged line ending at byte %d: %s; the line: %r",
                      name, pos, exc, line[:8192])
    return records, pos


class Spool:
    """The process's spool file; every method that touches the disk is a coroutine run on
    the spool's own thread. ``depth`` is the number of events in the file."""

    def __init__(self, directory: str | Path, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.directory = Path(directory)
        self.max_events = max_events
        self.depth = 0
        self.error: str | None = None  # the last append failed: why
        self._fd: int | None = None
        self._path: Path | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-spool")

    @property
    def path(self) -> Path | None:
        return self._path

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def open(self) -> None:
        """Adopt what dead processes left (and repair a torn tail); creates nothing when
        there is nothing to adopt."""
        await self._call(self._open)

    async def append(self, records: list[SpoolRecord]) -> None:
        """Durable on return (written and fsync'd)."""
        try:
            await self._call(self._append, records)
        except OSError as exc:
            self.error = f"cannot write the usage spool in {self.directory}: {exc}"
            raise
        self.error = None

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
        that is gone left in it), created when there is none."""
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
            self._fd, self._path = fd, path
            _fsync_dir(self.directory)
            records, end = decode(_read_all(fd), str(path))
            size = os.fstat(fd).st_size
            if end != size:
                log.warning("%s: cutting a torn last line (%d bytes)", path, size - end)
                os.ftruncate(fd, end)
                os.fsync(fd)
            self.depth = len(records)
            return fd

    def _open(self) -> None:
        if not self.directory.is_dir() or not any(self.directory.glob(_PATTERN)):
            return
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
                    _write_all(own, b"".join(encode(r) for r in records))
                    os.fsync(own)
                    self.depth += len(records)
                    log.warning("adopted %d spooled usage events from %s", len(records), other)
                other.unlink()
                _fsync_dir(self.directory)
            finally:
                os.close(fd)

    def _append(self, records: list[SpoolRecord]) -> None:
        fd = self._claim()
        _write_all(fd, b"".join(encode(r) for r in records))
        os.fsync(fd)
        self.depth += len(records)

    def _read(self) -> tuple[list[SpoolRecord], int]:
        if self._fd is None:
            return [], 0
        return decode(_read_all(self._fd), str(self._path))

    def _drop(self, offset: int, count: int) -> None:
        if self._fd is None or self._path is None or offset == 0:
            return
        os.lseek(self._fd, offset, os.SEEK_SET)
        rest = _read_rest(self._fd)
        tmp = self._path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, rest)
            os.fsync(fd)
            os.replace(tmp, self._path)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)  # its lock goes with it; the new file is locked already
        self._fd = fd
        self.depth = max(0, self.depth - count)

    def _close(self) -> None:
        if self._fd is not None:
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
    return _read_rest(fd)


def _read_rest(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
