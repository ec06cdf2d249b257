"""The local disk tier: KV pages in files below the host tier, kept across restarts.

``RemoteLink`` writes blocks through to it and fetches from it before Valkey. Its directory
holds ``kvgate-disk-tier`` (``MARKER``: kvgate uses only a directory it made or an empty
one it marks), ``lock`` (``flock``: one process), ``kv/<2 hex>/<block hash hex>`` (a record
per block: ``KVD1``, TTL, length, the ``RecordCodec`` record, an xxh3-128 digest, then the
expiry and its CRC, the one field rewritten in place), ``tmp/`` (records being written),
``epochs`` (flushed namespaces' epochs) and ``wipe`` (an epoch could not be saved).
Nothing there is opened through a link (``O_NOFOLLOW``). Writes are bounded by a byte
queue and a token bucket; ``capacity_bytes`` is kept by evicting the least recently used
leaves (a chain goes from its end). Every file-system error is a miss or a dropped write,
counted in ``errors``. docs/architecture.md (Disk tier) has the reasons.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import json
import logging
import os
import queue
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvgate.cachestore.hashing import xxh3_128
from kvgate.cachestore.record import (
    DIGEST,
    HEADER,
    FetchedBlock,
    RecordCodec,
    RemoteRecord,
)
from kvgate.cachestore.stats import DiskTierStats
from kvgate.kernels.layout import KVLayout

log = logging.getLogger("kvgate.cache.disk")

DISK_MAGIC = b"KVD1"
_HEAD = struct.Struct("<4sdI")  # magic, TTL seconds, record length
_TAIL = struct.Struct("<dI")  # expiry (time.time()), crc32 of the expiry and the digest
_MAX_TTL_S = 365 * 86400.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NAME = re.compile(f"[0-9a-f]{{{2 * DIGEST}}}")  # a record: its block hash in hex
_SUB = re.compile("[0-9a-f]{2}")  # kv/'s subdirectories: a hash's first byte
_TMP = re.compile(f"(?:[0-9a-f]{{{2 * DIGEST}}}\\.[0-9]+|epochs)")  # what tmp/ holds
MARKER = "kvgate-disk-tier"  # in a directory kvgate uses; its text is the format
MARKER_TEXT = b"kvgate disk tier 1\n"
WIPE = "wipe"  # left by a flush whose epoch could not be saved: the next start deletes all


def record_size(layout: KVLayout, namespace: str, token_bytes: int) -> int:
    """Bytes one block takes on disk: its page and about 100 bytes with the namespace and
    tokens (what ``--disk-cache-bytes`` counts)."""
    return _HEAD.size + HEADER.size + 2 * DIGEST + len(namespace.encode()) + token_bytes + \
        layout.page_bytes + DIGEST + _TAIL.size


def _ttl(ttl_s: float) -> float:
    """A TTL a record can hold: NaN is 0 (expired), at most a year."""
    return min(max(0.0, ttl_s), _MAX_TTL_S) if ttl_s == ttl_s else 0.0


class DiskTierUnavailable(RuntimeError):
    """The directory cannot be used (not creatable, not writable, or another process's)."""


@dataclass(frozen=True)
class DiskTierConfig:
    """``kvgate serve --disk-cache-*``; see docs/architecture.md (Disk tier)."""

    path: str
    capacity_bytes: int
    write_bytes_per_s: int = 256 * 1024 * 1024  # all writers together
    queue_bytes: int = 64 * 1024 * 1024  # page bytes waiting to be written, at most
    writers: int = 2
    # the cost model's read bandwidth and latency (a local NVMe by default)
    read_bytes_per_s: int = 2_000_000_000
    read_latency_s: float = 0.0002
    timeout_ms: int = 1000  # a fetch stops reading further blocks after this
    max_fetch_blocks: int = 1024
    max_fetch_bytes: int = 512 * 1024 * 1024


@dataclass
class _Entry:
    size: int
    expires_at: float  # wall clock
    ttl_s: float
    namespace: str
    epoch: int
    parent: bytes  # the parent block's hash (its record's): chains are evicted from the end
    stamp: int = 0  # when it was last written or read (``DiskTier._clock``)


_NOT_A_FILE = _Entry(0, 0.0, 0.0, "", -1, b"")  # a name in kv/ that is not a regular file


@dataclass
class _Put:
    record: RemoteRecord
    epoch: int
    nbytes: int


@dataclass
class _Task:
    run: Callable[[], None]


@dataclass
class _Counters:
    lock: threading.Lock = field(default_factory=threading.Lock)
    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("hits", "hit_bytes", "misses", "rejected", "expired", "skipped", "writes",
         "write_bytes", "dropped", "evicted", "errors"), 0))

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                self.values[k] += v


class _Bucket:
    """Bytes per second for all writers together: a write takes its bytes first and
    sleeps off any debt (``stop`` wakes the sleepers at shutdown)."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self.rate = max(1.0, float(rate))
        self.burst = self.rate / 10
        self.tokens = self.burst
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.stop = stop

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            self.stop.wait(wait)


class DiskTier:
    """One replica's cache directory: write-behind, verified reads, an index in memory."""

    name = "disk"  # how a block found here is reported (``PrefixMatch.blocks``)

    def __init__(self, config: DiskTierConfig, layout: KVLayout, model_id: str,
                 wall_clock: Callable[[], float] = time.time) -> None:
        """``wall_clock``: what expiries are measured against (seconds since 1970, as they
        are stored; replaceable so tests need no sleeping)."""
        block = record_size(layout, "", 4 * layout.block_size)
        if config.capacity_bytes < block:
            raise DiskTierUnavailable(
                f"--disk-cache-bytes {config.capacity_bytes} holds no block (one takes about "
                f"{block} bytes on disk)")
        self.config = config
        self.wall = wall_clock
        self.layout = layout
        self.codec = RecordCodec(layout, model_id)
        self.root = Path(config.path)
        self.counters = _Counters()
        self._lock = threading.Lock()  # index, epochs, used bytes
        self._index: dict[bytes, _Entry] = {}
        # eviction takes the least recently used leaf: a record no indexed record names as
        # its parent (a chain goes from its end; a fetch starts at the first block)
        self._children: dict[bytes, int] = {}  # parent hash -> indexed records naming it
        self._leaves: list[tuple[int, bytes]] = []  # heap of (stamp, hash); stale ones skipped
        self._clock = 0
        self._used = 0  # bytes of indexed records and of writes under way
        self._epochs: dict[str, int] = {}
        self._epochs_lock = threading.Lock()  # raising and saving them, one flush at a time
        self._epochs_unsaved = False  # a flush's epoch could not be saved (WIPE is left)
        self._healthy = True
        self._queue: queue.Queue[_Put | _Task | None] = queue.Queue()
        self._queued_bytes = 0
        self._pending = 0
        self._queue_lock = threading.Lock()
        self._idle = threading.Condition(self._queue_lock)  # notified when nothing is pending
        self._stop = threading.Event()
        self._bucket = _Bucket(config.write_bytes_per_s, self._stop)
        self._lock_fd = self._open_dir()
        try:
            try:
                self._load_epochs()
                self._scan()
            except OSError as exc:
                raise DiskTierUnavailable(f"--disk-cache-dir {self.root}: cannot read it "
                                          f"({exc.strerror or exc})") from exc
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._writers = [threading.Thread(target=self._write_loop, name=f"kvgate-disk-tier-{i}",
                                          daemon=True) for i in range(max(1, config.writers))]
        for t in self._writers:
            t.start()

    # -- the directory ------------------------------------------------------------------------
    def _open_dir(self) -> int:
        """Take the directory (see the module's docstring: kvgate uses one it made, or an
        empty one it then marks; it refuses any other) and its lock; → the lock's fd."""
        created = False
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self.root, 0o700)
                created = True
            except FileExistsError:
                pass
            # the configured path may be a link the operator made; nothing below it may be
            dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC |
                          (_NOFOLLOW if created else 0))
        except OSError as exc:
            raise DiskTierUnavailable(
                f"--disk-cache-dir {self.root}: cannot use it ({exc.strerror or exc})") from exc
        try:
            if self._claim(dfd) or created:  # a directory it made or was given empty
                try:
                    os.fchmod(dfd, 0o700)
                except OSError as exc:  # (not its owner): its files are private anyway
                    log.warning("disk tier: cannot make %s private (%s)", self.root, exc)
            for sub in ("kv", "tmp"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, 0o700, dir_fd=dfd)
                if not stat.S_ISDIR(os.stat(sub, dir_fd=dfd, follow_symlinks=False).st_mode):
                    raise DiskTierUnavailable(
                        f"--disk-cache-dir {self.root}: {sub}/ is not a directory (a link or "
                        "a file): kvgate does not follow links in its cache directory")
            fd = os.open("lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK,
                         0o600, dir_fd=dfd)
        except OSError as exc:
            raise DiskTierUnavailable(
                f"--disk-cache-dir {self.root}: cannot use it ({exc.strerror or exc})") from exc
        finally:
            os.close(dfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DiskTierUnavailable(f"--disk-cache-dir {self.root}: lock is not a file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = b""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0)
            os.close(fd)
            raise DiskTierUnavailable(
                f"--disk-cache-dir {self.root} is in use by another kvgate process (pid "
                f"{holder.decode(errors='replace').strip() or '?'}): give each replica its "
                "own directory") from exc
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _claim(self, dfd: int) -> bool:
        """Check the directory's marker, or mark an empty directory as this tier's (→ True);
        refuse any other directory (``DiskTierUnavailable``). ``lost+found`` (the root of a
        volume) counts as empty: kvgate never touches it."""
        try:
            fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK,
                         dir_fd=dfd)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                ok = stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 64) == MARKER_TEXT
            finally:
                os.close(fd)
            if not ok:
                raise DiskTierUnavailable(
                    f"--disk-cache-dir {self.root}: its {MARKER} file is not this version's "
                    f"({MARKER_TEXT.decode().strip()!r}): delete the directory or point "
                    "--disk-cache-dir at a new one")
            return False
        if set(os.listdir(dfd)) - {"lost+found"}:
            raise DiskTierUnavailable(
                f"--disk-cache-dir {self.root} is not empty and holds no {MARKER} file: "
                "kvgate uses only a directory it made or an empty one (its files there would "
                "be deleted); point --disk-cache-dir at a new or empty directory")
        try:
            fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                         0o600, dir_fd=dfd)
        except FileExistsError as exc:  # another process marked it meanwhile
            raise DiskTierUnavailable(
                f"--disk-cache-dir {self.root} is in use by another kvgate process: give "
                "each replica its own directory") from exc
        try:
            os.write(fd, MARKER_TEXT)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(dfd)
        return True

    def _path(self, block_hash: bytes) -> Path:
        name = block_hash.hex()
        return self.root / "kv" / name[:2] / name

    def _open_small(self, name: str) -> int | None:
        """Open a file at the root for reading (never through a link, never blocking on a
        FIFO); None if there is none. ``OSError`` if it is not a regular file."""
        try:
            fd = os.open(self.root / name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        return fd

    def _load_epochs(self) -> None:
        path = self.root / "epochs"
        try:
            fd = self._open_small("epochs")
            if fd is None:
                return
            try:
                raw = self._read_all(fd, 64 * 1024 * 1024)
            finally:
                os.close(fd)
        except OSError as exc:
            raise DiskTierUnavailable(f"--disk-cache-dir {self.root}: cannot read "
                                      f"{path.name} ({exc.strerror or exc})") from exc
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not all(
                    isinstance(k, str) and type(v) is int and v >= 0 for k, v in data.items()):
                raise ValueError("not an object of namespace -> epoch")
        except ValueError as exc:
            # which namespaces were flushed is unknown: nothing on disk can be trusted
            log.error("disk tier: %s is unreadable (%s); every record is deleted", path, exc)
            self._epochs = {}
            self._wipe()
            return
        self._epochs = dict(data)

    def _save_epochs(self, epochs: dict[str, int]) -> None:
        """(under ``_epochs_lock``) Write the epochs file durably: a temporary file,
        fsync'd, renamed, the directory fsync'd."""
        tmp = self.root / "tmp" / "epochs"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC |
                     os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(tmp))
            data = memoryview(json.dumps(epochs).encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / "epochs")
        self._fsync_root()

    def _fsync_root(self) -> None:
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _record_files(self) -> Iterator[tuple[Path, bytes]]:
        """Every regular file in ``kv/`` named as this tier names records (``kv/ab/ab…``,
        lower-case hex), with its block hash; nothing else there is touched. A link named
        as one of ``kv/``'s subdirectories is removed (only the link)."""
        kv = self.root / "kv"
        if not stat.S_ISDIR(os.lstat(kv).st_mode):
            raise OSError(errno.ENOTDIR, "kv/ is not a directory", str(kv))
        with os.scandir(kv) as subs:
            subdirs = []
            for sub in subs:
                if not _SUB.fullmatch(sub.name):
                    continue
                if sub.is_symlink():
                    log.warning("disk tier: %s is a link; removed (not followed)", sub.path)
                    with contextlib.suppress(OSError):
                        os.unlink(sub.path)
                elif sub.is_dir(follow_symlinks=False):
                    subdirs.append(sub.path)
        for sub_path in subdirs:
            prefix = os.path.basename(sub_path)
            try:
                with os.scandir(sub_path) as found:
                    names = [(f.name, f.is_file(follow_symlinks=False)) for f in found]
            except OSError:
                continue
            for name, regular in names:
                if regular and _NAME.fullmatch(name) and name[:2] == prefix:
                    yield Path(sub_path) / name, bytes.fromhex(name)

    def _wipe(self) -> None:
        """Delete every record (only files named as records; never through a link)."""
        for path, _ in list(self._record_files()):
            with contextlib.suppress(OSError):
                path.unlink()

    def _scan(self) -> None:
        """Index every record in ``kv/`` (see the module's docstring)."""
        started = time.monotonic()
        with os.scandir(self.root / "tmp") as leftovers:  # writes a crash left unfinished
            unfinished = [e.path for e in leftovers
                          if _TMP.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
        for name in unfinished:
            with contextlib.suppress(OSError):
                os.unlink(name)
        if os.path.lexists(self.root / WIPE):  # a flush whose epoch could not be saved
            log.warning("disk tier %s: a flush was not saved before the last stop; every "
                        "record is deleted", self.root)
            self._wipe()
            with contextlib.suppress(OSError):  # else the next start deletes them again
                os.unlink(self.root / WIPE)
                self._fsync_root()
        now = self.wall()
        found: list[tuple[float, bytes, _Entry]] = []
        deleted = 0
        for f, block_hash in self._record_files():
            entry, mtime = self._read_head(f)
            if entry is _NOT_A_FILE:
                continue  # replaced by something else meanwhile: not ours to delete
            if entry is None or entry.expires_at <= now or \
                    self._epochs.get(entry.namespace, 0) != entry.epoch:
                with contextlib.suppress(OSError):
                    f.unlink()
                deleted += 1
                continue
            found.append((mtime, block_hash, entry))
        found.sort(key=lambda t: t[0])
        for _, block_hash, entry in found:
            self._link(block_hash, entry)
            self._used += entry.size
        victims = self._evict_for(0)
        self._unlink(victims)
        log.info("disk tier %s: %d records (%d bytes) indexed, %d deleted (expired, flushed "
                 "or unreadable), %d evicted over --disk-cache-bytes, in %.1f s", self.root,
                 len(self._index), self._used, deleted, len(victims),
                 time.monotonic() - started)

    def _read_head(self, path: Path) -> tuple[_Entry | None, float]:
        """A record's entry from its first bytes and its tail; (None, 0) if it is not one,
        (``_NOT_A_FILE``, 0) if ``path`` is not a regular file (a link, a FIFO, ...)."""
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            return (_NOT_A_FILE if exc.errno == errno.ELOOP else None), 0.0
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _NOT_A_FILE, 0.0
            want = _HEAD.size + HEADER.size + 2 * DIGEST
            head = os.pread(fd, want, 0)
            if len(head) < want:
                return None, 0.0
            magic, ttl_s, body_len = _HEAD.unpack_from(head)
            ns_len = HEADER.unpack_from(head, _HEAD.size)[1]
            if magic != DISK_MAGIC or st.st_size != _HEAD.size + body_len + DIGEST + \
                    _TAIL.size or ns_len > body_len:
                return None, 0.0
            head += os.pread(fd, ns_len, want)
            tail = os.pread(fd, DIGEST + _TAIL.size, st.st_size - DIGEST - _TAIL.size)
        except OSError:
            return None, 0.0
        finally:
            os.close(fd)
        rec = RecordCodec.head(head[_HEAD.size:])
        expires_at = self._expiry(tail)
        if rec is None or expires_at is None:
            return None, 0.0
        # the record's body: header, layout signature, parent hash, namespace, ...
        parent = head[_HEAD.size + HEADER.size + DIGEST:_HEAD.size + HEADER.size + 2 * DIGEST]
        return _Entry(int(st.st_size), expires_at, ttl_s, rec.namespace, rec.epoch,
                      parent), st.st_mtime

    @staticmethod
    def _expiry(tail: bytes) -> float | None:
        if len(tail) != DIGEST + _TAIL.size:
            return None
        expires_at, crc = _TAIL.unpack_from(tail, DIGEST)
        if crc != zlib.crc32(tail[:DIGEST + 8]):
            return None
        return float(expires_at)

    @staticmethod
    def _tail(digest: bytes, expires_at: float) -> bytes:
        exp = struct.pack("<d", expires_at)
        return exp + struct.pack("<I", zlib.crc32(digest + exp))

    # -- writing ------------------------------------------------------------------------------
    def file_bytes(self, record: RemoteRecord, epoch: int, now: float) -> bytes:
        """What ``record`` is stored as (see the module's docstring)."""
        body = self.codec.encode(record, epoch)
        ttl_s = _ttl(record.ttl_s)
        head = _HEAD.pack(DISK_MAGIC, ttl_s, len(body)) + body
        digest = xxh3_128(head)
        return head + digest + self._tail(digest, now + ttl_s)

    def put(self, records: Sequence[RemoteRecord]) -> int:
        """Queue records for writing, in order, while the queue has room (never blocks).
        → how many were taken (a prefix of ``records``)."""
        nbytes = self.layout.page_bytes
        with self._queue_lock:
            taken = min(len(records), max(0, self.config.queue_bytes - self._queued_bytes)
                        // nbytes)
            self._queued_bytes += taken * nbytes
            self._pending += taken
        with self._lock:
            epochs = [self._epochs.get(r.namespace, 0) for r in records[:taken]]
        # parents first: a write cut short (a stop, a crash) leaves a prefix of the chain,
        # which a fetch can use (it starts at the first block); eviction takes leaves only
        for record, epoch in zip(records[:taken], epochs, strict=True):
            self._queue.put(_Put(record, epoch, nbytes))
        if taken < len(records):
            self.counters.add(dropped=len(records) - taken)
        return taken

    def room(self) -> int:
        """Blocks ``put`` would take now."""
        with self._queue_lock:
            return max(0, self.config.queue_bytes - self._queued_bytes) // self.layout.page_bytes

    def flush_namespace(self, namespace: str) -> None:
        """Make every record of ``namespace`` a miss at once (a new epoch, in memory now)
        and after a restart (the epoch is saved before this returns: a write of a few bytes
        and two fsyncs); a writer thread deletes the files. If the epoch cannot be saved,
        the files are deleted now and the directory marked to be emptied at the next start
        (``WIPE``): flushed records are never read again, whatever happens next."""
        with self._epochs_lock:  # saved in the order they were raised
            with self._lock:
                self._epochs[namespace] = max(self._epochs.get(namespace, 0) + 1,
                                              time.time_ns() // 1000)
                epochs = dict(self._epochs)
                gone = [h for h, e in self._index.items() if e.namespace == namespace]
                for h in gone:
                    self._used -= self._unlink_entry(h).size
            try:
                self._save_epochs(epochs)
            except OSError as exc:
                self._epochs_unsaved = True
                self._error("saving the epoch of flushed namespace %s (its records are "
                            "deleted now, and every record at the next start)", exc, namespace)
                self._mark_wipe()
                self._unlink(gone)
                return
            if self._epochs_unsaved:  # an earlier flush's epoch is in this file too
                self._clear_wipe()
        with self._queue_lock:
            self._pending += 1
        self._queue.put(_Task(lambda: self._finish_flush(gone)))

    def _mark_wipe(self) -> None:
        """(under ``_epochs_lock``) Leave ``WIPE``: the next start deletes every record."""
        try:
            fd = os.open(self.root / WIPE, os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _CLOEXEC,
                         0o600)
            os.close(fd)
            self._fsync_root()
        except OSError as exc:
            self._error("marking the directory to be emptied at the next start", exc)

    def _clear_wipe(self) -> None:
        """(under ``_epochs_lock``) Every epoch is saved: ``WIPE`` is no longer needed."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / WIPE)
            self._fsync_root()
        except OSError as exc:
            self._error("removing the wipe marker", exc)  # the next start empties it: safe
            return
        self._epochs_unsaved = False

    def _finish_flush(self, gone: list[bytes]) -> None:
        with self._lock:  # not those written again since, under the new epoch
            gone = [h for h in gone if h not in self._index]
        self._unlink(gone)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if isinstance(item, _Task):
                    item.run()
                else:
                    with self._queue_lock:
                        self._queued_bytes -= item.nbytes
                    self._write(item)
            except Exception:  # a bug here loses the block, never the writer
                self.counters.add(errors=1, dropped=1)
                log.exception("disk tier write failed")
            finally:
                with self._queue_lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def _write(self, item: _Put) -> None:
        record = item.record
        with self._lock:
            if self._epochs.get(record.namespace, 0) != item.epoch:  # flushed since
                self.counters.add(dropped=1)
                return
        now = self.wall()
        data = self.file_bytes(record, item.epoch, now)
        size = len(data)
        if size > self.config.capacity_bytes:
            self.counters.add(dropped=1)
            return
        self._bucket.take(size)
        if self._stop.is_set():
            self.counters.add(dropped=1)
            return
        with self._lock:
            if record.block_hash in self._index:
                self._used -= self._unlink_entry(record.block_hash).size
            victims = self._evict_for(size)
            self._used += size  # reserved while it is written
        self._unlink(victims)
        path = self._path(record.block_hash)
        tmp = self.root / "tmp" / f"{record.block_hash.hex()}.{threading.get_ident()}"
        try:
            self._write_file(tmp, data)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                self._make_dir(path.parent)
                os.replace(tmp, path)
        except OSError as exc:
            with self._lock:
                self._used -= size
            with contextlib.suppress(OSError):
                tmp.unlink()
            self.counters.add(dropped=1)
            self._error("writing a block", exc)
            return
        with self._lock:
            if self._epochs.get(record.namespace, 0) != item.epoch:  # flushed meanwhile
                self._used -= size
                stale = True
            else:
                ttl_s = _ttl(record.ttl_s)
                if record.block_hash in self._index:  # written twice at once
                    self._used -= self._unlink_entry(record.block_hash).size
                self._link(record.block_hash, _Entry(size, now + ttl_s, ttl_s,
                                                     record.namespace, item.epoch,
                                                     record.parent_hash))
                stale = False
        if stale:
            self._unlink([record.block_hash])
            self.counters.add(dropped=1)
            return
        self._healthy = True
        self.counters.add(writes=1, write_bytes=self.layout.page_bytes)

    def _write_file(self, tmp: Path, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            self._make_dir(tmp.parent)
            fd = os.open(tmp, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
        finally:
            os.close(fd)

    def _make_dir(self, path: Path) -> None:
        """Make a subdirectory deleted under the tier again, only while the root exists (a
        vanished root stays gone: writes fail and count until an operator restores it)."""
        if not self.root.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the disk cache directory is gone",
                                    str(self.root))
        path.mkdir(mode=0o700, parents=False, exist_ok=True)

    # -- the index (under ``_lock``) -------------------------------------------------------------
    def _link(self, block_hash: bytes, entry: _Entry) -> None:
        """Index a record (written or read now: the most recently used). Its bytes are
        the caller's to count in ``_used``."""
        self._index[block_hash] = entry
        if entry.parent != block_hash:  # (a crafted record may name itself)
            self._children[entry.parent] = self._children.get(entry.parent, 0) + 1
        self._use(block_hash, entry)

    def _unlink_entry(self, block_hash: bytes) -> _Entry:
        """Take a record out of the index; → it (its bytes are the caller's to uncount)."""
        entry = self._index.pop(block_hash)
        if entry.parent != block_hash:
            left = self._children.get(entry.parent, 0) - 1
            if left > 0:
                self._children[entry.parent] = left
            else:
                self._children.pop(entry.parent, None)
                parent = self._index.get(entry.parent)
                if parent is not None:  # a leaf now, as recently used as it last was
                    self._push_leaf(entry.parent, parent)
        return entry

    def _use(self, block_hash: bytes, entry: _Entry) -> None:
        """The record was written or read now."""
        self._clock += 1
        entry.stamp = self._clock
        if block_hash not in self._children:
            self._push_leaf(block_hash, entry)

    def _push_leaf(self, block_hash: bytes, entry: _Entry) -> None:
        heapq.heappush(self._leaves, (entry.stamp, block_hash))
        if len(self._leaves) > 2 * len(self._index) + 1024:  # drop the stale ones
            self._leaves = [(e.stamp, h) for h, e in self._index.items()
                            if h not in self._children]
            heapq.heapify(self._leaves)

    def _evict_for(self, size: int) -> list[bytes]:
        """Take least recently used leaves out of the index until ``size`` more bytes
        fit; → their hashes, to be unlinked outside the lock."""
        victims: list[bytes] = []
        while self._index and self._used + size > self.config.capacity_bytes:
            victim = None
            while self._leaves:
                stamp, block_hash = heapq.heappop(self._leaves)
                entry = self._index.get(block_hash)
                if entry is not None and entry.stamp == stamp and \
                        block_hash not in self._children:
                    victim = block_hash
                    break
            if victim is None:  # no leaf: records that name each other as parents
                victim = next(iter(self._index))
            self._used -= self._unlink_entry(victim).size
            victims.append(victim)
        if victims:
            self.counters.add(evicted=len(victims))
        return victims

    def _unlink(self, hashes: list[bytes]) -> None:
        for block_hash in hashes:
            try:
                self._path(block_hash).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._error("deleting a record", exc)

    def _forget(self, block_hash: bytes, entry: _Entry) -> None:
        """Take a record that cannot be read out of the index and off the disk."""
        if self._drop(block_hash, entry):
            self._unlink([block_hash])

    def _drop(self, block_hash: bytes, entry: _Entry) -> bool:
        """Take a record out of the index (its file is left); → whether it was there."""
        with self._lock:
            if self._index.get(block_hash) is not entry:
                return False
            self._used -= self._unlink_entry(block_hash).size
            return True

    def _check_dir(self) -> None:
        """A record was missing: if ``kv/`` itself is gone (the directory deleted under the
        tier), so is every record: the index is emptied (``files``, ``used_bytes``)."""
        if os.path.isdir(self.root / "kv"):
            return
        with self._lock:
            for entry in self._index.values():
                self._used -= entry.size
            self._index.clear()
            self._children.clear()
            self._leaves.clear()

    def _error(self, what: str, exc: OSError, *args: object) -> None:
        self.counters.add(errors=1)
        if self._healthy:  # logged once per run of failures, not once per block
            log.warning("disk tier: " + what + " failed: %r (a miss; counted in "
                        "kvgate_disk_tier_errors_total)", *args, exc)
        self._healthy = False

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until the write-behind queue is empty (tests, shutdown); → whether it is."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, drain_s: float = 2.0) -> None:
        """Let the writers finish the queue for up to ``drain_s`` (a restart finds those
        blocks), then stop them (what is left is dropped) and release the directory."""
        self.drain(drain_s)
        self._stop.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Task):
                with contextlib.suppress(Exception):
                    item.run()  # a flush's files are deleted even at shutdown
            elif isinstance(item, _Put):
                self.counters.add(dropped=1)
            if item is not None:
                with self._queue_lock:
                    self._pending -= 1
                    self._queued_bytes -= item.nbytes if isinstance(item, _Put) else 0
        for _ in self._writers:
            self._queue.put(None)
        for t in self._writers:
            t.join(timeout=5)
        with self._epochs_lock:
            if self._epochs_unsaved:  # a flush's epoch could not be saved: try once more
                with self._lock:
                    epochs = dict(self._epochs)
                with contextlib.suppress(OSError):
                    self._save_epochs(epochs)
                    self._clear_wipe()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1

    # -- fetching ----------------------------------------------------------------------------
    def fetch(self, namespace: str, parent_hash: bytes, hashes: Sequence[bytes],
              tokens: Sequence[bytes]) -> list[FetchedBlock]:
        """A prompt's blocks after ``parent_hash`` (their ``hashes`` and ``tokens``), as many
        consecutive ones as the disk holds and verify. File I/O: never call it on the engine
        thread."""
        deadline = time.monotonic() + self.config.timeout_ms / 1000
        with self._lock:
            epoch = self._epochs.get(namespace, 0)
        out: list[FetchedBlock] = []
        try:
            self._read_chain(namespace, parent_hash, hashes, tokens, epoch, deadline, out)
        finally:
            with self._lock:
                for fb in out:
                    entry = self._index.get(fb.block_hash)
                    if entry is not None:
                        self._use(fb.block_hash, entry)
        return out

    def _read_chain(self, namespace: str, parent_hash: bytes, hashes: Sequence[bytes],
                    tokens: Sequence[bytes], epoch: int, deadline: float,
                    out: list[FetchedBlock]) -> None:
        for i in range(len(hashes)):
            if i and time.monotonic() > deadline:
                break
            page = self._read(namespace, parent_hash if i == 0 else hashes[i - 1], hashes[i],
                              tokens[i], epoch)
            if page is None:
                break
            out.append(FetchedBlock(hashes[i], tokens[i], page))

    def _read(self, namespace: str, parent_hash: bytes, block_hash: bytes, tokens: bytes,
              epoch: int) -> torch.Tensor | None:
        """One block's page if the disk holds it and it verifies; else None (counted)."""
        now = self.wall()
        with self._lock:
            entry = self._index.get(block_hash)
        if entry is None:
            self.counters.add(misses=1)
            return None
        if entry.expires_at <= now:
            self._forget(block_hash, entry)
            self.counters.add(misses=1, expired=1)
            return None
        path = self._path(block_hash)
        try:
            fd = self._open_record(path)
        except FileNotFoundError as exc:
            with self._lock:
                ours = self._index.get(block_hash) is entry
            if ours:  # deleted under the tier (not by its own eviction)
                self._forget(block_hash, entry)
                self._error("reading a block", exc)
                self._check_dir()
            self.counters.add(misses=1)
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link put there: not ours to delete
                self._drop(block_hash, entry)
            else:
                self._forget(block_hash, entry)
            self._error("reading a block", exc)
            self.counters.add(misses=1)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device put there
                self._drop(block_hash, entry)
                self.counters.add(rejected=1)
                return None
            try:
                data = self._read_all(fd, entry.size + 1)
            except OSError as exc:
                self._forget(block_hash, entry)
                self._error("reading a block", exc)
                self.counters.add(misses=1)
                return None
            page = self._verify(data, parent_hash, namespace, tokens, epoch)
            if page is None:
                self._forget(block_hash, entry)
                self.counters.add(rejected=1)
                return None
            expires_at = self._expiry(data[-(DIGEST + _TAIL.size):])
            if expires_at is None or expires_at <= now:
                self._forget(block_hash, entry)
                self.counters.add(misses=1, expired=1)
                return None
            self._touch(fd, data, entry, now)
            return page
        finally:
            os.close(fd)

    @staticmethod
    def _open_record(path: Path) -> int:
        """Open for reading and, where allowed, for refreshing the expiry in place (the same
        file that was read, even if a writer replaces it meanwhile); never through a link,
        never waiting on a FIFO (the caller checks it is a regular file)."""
        flags = _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(path, os.O_RDWR | flags)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return os.open(path, os.O_RDONLY | flags)

    @staticmethod
    def _read_all(fd: int, limit: int) -> bytes:
        parts: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _verify(self, data: bytes, parent_hash: bytes, namespace: str, tokens: bytes,
                epoch: int) -> torch.Tensor | None:
        if len(data) < _HEAD.size + DIGEST + _TAIL.size:
            return None
        magic, _, body_len = _HEAD.unpack_from(data)
        end = _HEAD.size + body_len
        if magic != DISK_MAGIC or len(data) != end + DIGEST + _TAIL.size or \
                xxh3_128(data[:end]) != data[end:end + DIGEST]:
            return None
        return self.codec.decode(data[_HEAD.size:end], parent_hash, namespace, tokens, epoch)

    def _touch(self, fd: int, data: bytes, entry: _Entry, now: float) -> None:
        """A hit: the record expires ``TTL`` from now (in the index and in its file)."""
        expires_at = now + entry.ttl_s
        if expires_at - entry.expires_at < min(1.0, entry.ttl_s / 10):
            return  # hit again within a moment: not worth a write
        digest = data[-(DIGEST + _TAIL.size):-_TAIL.size]
        try:
            os.pwrite(fd, self._tail(digest, expires_at), len(data) - _TAIL.size)
        except OSError as exc:
            self._error("refreshing a block's expiry", exc)
            return
        entry.expires_at = expires_at

    # -- stats ----------------------------------------------------------------------------------
    def stats(self) -> DiskTierStats:
        with self.counters.lock:
            v = dict(self.counters.values)
        with self._queue_lock:
            queued = self._queued_bytes
        with self._lock:
            used, files = self._used, len(self._index)
        return DiskTierStats(available=self._healthy and self.root.is_dir(),
                             capacity_bytes=self.config.capacity_bytes, used_bytes=used,
                             files=files, queued_bytes=queued, **v)
