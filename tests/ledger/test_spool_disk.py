"""The usage spool on a full or failing disk.

A real full disk needs a small filesystem of its own (a tmpfs mounted as root), so every
test here stands ``FailingDisk`` in for it: the spool makes every write, fsync and
truncation through one ``DiskOps`` object, and ``FailingDisk`` fails them as a full disk
(a write stores what still fits, then ``ENOSPC``) or a failing one (``EIO``) does, from a
chosen call on, until the test gives the space back. The database goes away either for
real (SQLite's writer made read-only, PostgreSQL stopped) or, for the fuzz over every
position, by injection (``Outage``: every usage write raises what a dropped connection
raises), so each of its many runs stays short.

What must hold: an append that fails leaves nothing behind (the file is cut back to its
whole records, or, when even that fails, nothing past them is read and they are cut
before the next append), so no later event is ever joined to a fragment and skipped as
damaged; an answered event whose append failed is held in memory and billed exactly once
when the spool or the database takes it; new requests are refused while usage cannot be
kept, and admitted again within 5 s (two re-test periods, on the re-test timer's own
clock) of the disk having room, the database still away.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvgate.gateway.ledger import Billed, Ledger
from kvgate.gateway.ledger.committer import RETEST_S, SpoolTrouble
from kvgate.gateway.ledger.spool import DiskOps, Spool, SpoolRecord, decode, encode
from tests.ledger.conftest import event
from tests.ledger.pgserver import OwnPostgres
from tests.ledger.test_spool import readonly_writer, rows, until

DAMAGED = "skipping a damaged line"


class FailingDisk(DiskOps):
    """A stand-in for a full or failing disk. Counts every write, fsync and truncation the
    spool makes (``calls``); the one numbered ``at`` and, with ``lasting``, every one after
    it fail until ``heal``: a write first stores half of what it was given (``short``, as
    a disk filling up does), then raises ``error``. ``room``: bytes that still fit, after
    which writes fail the same way (a small filesystem filling up)."""

    def __init__(self, at: int | None = None, *, error: int = errno.ENOSPC,
                 lasting: bool = True, short: bool = True, room: int | None = None) -> None:
        self.at, self.error, self.lasting, self.short, self.room = at, error, lasting, short, room
        self.calls = 0
        self.failures = 0
        self._stored_part = False

    def heal(self) -> None:
        """Space again: a failure that has begun ends (one not begun yet stays due)."""
        self.room = None
        if self.failures:
            self.at = None

    def _fails(self) -> bool:
        n = self.calls
        self.calls += 1
        if self.at is None or n < self.at or (n > self.at and not self.lasting):
            return False
        self.failures += 1
        return True

    def _raise(self) -> None:
        raise OSError(self.error, os.strerror(self.error))

    def write(self, fd: int, data: memoryview) -> int:
        if self.room is not None and len(data) > self.room:
            if self.room > 0:
                n, self.room = os.write(fd, data[:self.room]), 0
                return n
            self.failures += 1
            self._raise()
        if self._fails():
            if self.short and not self._stored_part and len(data) > 1:
                self._stored_part = True
                return os.write(fd, data[:len(data) // 2])
            self._raise()
        n = os.write(fd, data)
        if self.room is not None:
            self.room -= n
        return n

    def fsync(self, fd: int) -> None:
        if self._fails():
            self._raise()
        os.fsync(fd)

    def truncate(self, fd: int, length: int) -> None:
        if self._fails():
            self._raise()
        os.ftruncate(fd, length)


class Outage:
    """The database away, injected: each usage write and the replayer's check raise what a
    dropped connection raises (an ``OSError``) while ``down``."""

    def __init__(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = False
        committer = ledger._committer
        write, probe = committer._write, committer.probe_database

        async def _write(*args: Any, **kwargs: Any) -> Any:
            self._check()
            return await write(*args, **kwargs)

        async def _probe() -> None:
            self._check()
            await probe()

        monkeypatch.setattr(committer, "_write", _write)
        monkeypatch.setattr(committer, "probe_database", _probe)

    def _check(self) -> None:
        if self.down:
            raise OSError(errno.ECONNREFUSED, "connection refused (database away, injected)")


async def by_hand(ledger: Ledger) -> None:
    """Stop the ledger's replayer and spool re-test tasks: the test replays and re-tests
    itself, so each run makes the same disk calls in the same order."""
    committer = ledger._committer
    for task in (committer._replayer, committer._retester):
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def spooled(n: int) -> list[SpoolRecord]:
    return [SpoolRecord(event(1), None) for _ in range(n)]


def ids(records: list[SpoolRecord]) -> list[str]:
    return [r.event.request_id for r in records]


# -- the file ------------------------------------------------------------------------------


async def test_a_failed_append_is_cut_back_and_the_next_never_joins_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk = FailingDisk(room=0)
    spool = Spool(tmp_path / "spool", ops=disk)
    first, torn, later = spooled(2), spooled(3), spooled(1)
    disk.room = len(b"".join(encode(r) for r in first)) + 100  # the next append tears
    await spool.append(first)
    size = os.path.getsize(tmp_path / "spool" / "usage-0.spool")
    with pytest.raises(OSError) as failed:
        await spool.append(torn)
    assert failed.value.errno == errno.ENOSPC and spool.error and "No space" in spool.error
    assert os.path.getsize(tmp_path / "spool" / "usage-0.spool") == size  # cut back
    disk.heal()
    await spool.append(later)
    assert spool.error is None and spool.depth == 3
    with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
        records, _ = await spool.read()
    assert ids(records) == ids(first + later) and DAMAGED not in caplog.text
    await spool.close()


async def test_a_cut_that_fails_too_is_remembered(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Write, fsync and the cut back all fail: the bytes past the whole records stay, are
    never read, and are cut before the next append; a restart meanwhile cuts them too."""
    disk = FailingDisk()
    spool = Spool(tmp_path / "spool", ops=disk)
    path = tmp_path / "spool" / "usage-0.spool"
    first = spooled(2)
    await spool.append(first)
    good = os.path.getsize(path)
    disk.at = disk.calls  # from the next call on: the half-stored write, then errors
    with pytest.raises(OSError):
        await spool.append(spooled(2))
    assert os.path.getsize(path) > good  # the fragment is still there ...
    records, end = await spool.read()  # ... and never read
    assert ids(records) == ids(first) and end == good
    with pytest.raises(OSError):
        await spool.append(spooled(1))  # the fragment cannot be cut: nothing is written
    with pytest.raises(OSError):
        await spool.probe()
    disk.heal()
    await spool.probe()
    assert os.path.getsize(path) == good and spool.error is None
    later = spooled(1)
    await spool.append(later)
    with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
        assert ids((await spool.read())[0]) == ids(first + later)
    assert DAMAGED not in caplog.text

    # A process that dies with a fragment it could not cut: the next one cuts it on open.
    disk.at = disk.calls
    with pytest.raises(OSError):
        await spool.append(spooled(2))
    os.close(spool._fd or -1)  # gone without closing: its lock with it
    spool._fd = None
    spool._pool.shutdown()
    again = Spool(tmp_path / "spool")
    with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
        await again.open()
        records, _ = await again.read()
        await again.append(spooled(1))
        assert len((await again.read())[0]) == 4
    assert ids(records) == ids(first + later) and DAMAGED not in caplog.text
    await again.close()


def test_a_damaged_last_line_is_a_torn_tail_not_a_skipped_line(
        caplog: pytest.LogCaptureFixture) -> None:
    good = b"".join(encode(r) for r in spooled(2))
    last = bytearray(encode(spooled(1)[0]))
    last[20] ^= 0x01
    with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
        records, end = decode(good + bytes(last))
    assert len(records) == 2 and end == len(good)  # cut there: the caller truncates
    assert "torn last line" in caplog.text and DAMAGED not in caplog.text


async def test_replay_empties_the_file_in_place(tmp_path: Path) -> None:
    """Dropping everything replayed needs no space: the file is truncated, not copied."""
    disk = FailingDisk()
    spool = Spool(tmp_path / "spool", ops=disk)
    await spool.append(spooled(3))
    records, end = await spool.read()
    disk.room = 0  # a full disk: no copy could be written
    await spool.drop(end, len(records))
    assert spool.depth == 0 and os.path.getsize(tmp_path / "spool" / "usage-0.spool") == 0
    await spool.close()


async def test_an_adoption_the_disk_refuses_is_retried(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    dead = Spool(spool_dir)
    left = spooled(2)
    await dead.append(left)
    os.rename(spool_dir / "usage-0.spool", spool_dir / "usage-5.spool")
    (spool_dir / "usage-0.spool").write_bytes(b"")  # the new process's own file, empty
    await dead.close()
    disk = FailingDisk(room=0)
    spool = Spool(spool_dir, ops=disk)
    await spool.open()  # serves anyway
    assert spool.error and not spool.healthy and (spool_dir / "usage-5.spool").exists()
    disk.heal()
    await spool.probe()
    assert spool.healthy and not (spool_dir / "usage-5.spool").exists()
    assert ids((await spool.read())[0]) == ids(left)
    await spool.close()


# -- the fuzz: a failure at every disk call of an outage ------------------------------------


async def _outage_run(url: str, spool_dir: Path, disk: FailingDisk,
                      monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[dict[str, Billed], Ledger, int]:
    """Two outages: appends one by one and in a batch, a re-test, space back (where a
    failure that began meanwhile ends, and the spool must be in use again, the database
    still away), replay in between and at the end. → every answer by request id, the
    ledger, the tenant."""
    ledger = await Ledger.open(url, spool_dir=spool_dir)
    await by_hand(ledger)
    outage = Outage(ledger, monkeypatch)
    committer = ledger._committer
    tenant = (await ledger.create_tenant(f"t-{spool_dir.name}"))["id"]
    answers: dict[str, Billed] = {}

    async def record(n: int = 1) -> None:
        events = [event(tenant) for _ in range(n)]
        billed = await asyncio.gather(*(ledger.record(e) for e in events))
        answers.update((e.request_id, b) for e, b in zip(events, billed, strict=True))

    async def replay() -> None:
        outage.down = False
        with contextlib.suppress(SpoolTrouble):  # the file could not be cut: retried later
            await committer.replay()

    async def space_back() -> None:
        disk.heal()
        if not await committer.retest_spool():  # the failure began in this very re-test
            disk.heal()
            assert await committer.retest_spool() is True
        assert ledger.refusing() is None

    await record()  # the database up: the tenant's prices known
    outage.down = True
    ledger.spool.ops = disk  # type: ignore[union-attr]
    await record()
    await record(3)  # one batch: one append of three records
    await committer.retest_spool()
    await record()
    await space_back()  # the database still away
    await record(2)
    await replay()
    outage.down = True  # the next outage: appended where the first one's events were
    await record()
    await record(2)
    await space_back()
    await replay()
    await space_back()
    await replay()
    assert not committer.held and ledger.spool_depth() == 0
    return answers, ledger, tenant


@pytest.fixture
def healthy_calls(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many disk calls the outages make on a healthy disk: the positions to fail."""
    disk = FailingDisk()

    async def run() -> None:
        _, ledger, _ = await _outage_run(db_url, tmp_path / "healthy", disk, monkeypatch)
        await ledger.close()
    asyncio.run(run())
    return disk.calls


@pytest.mark.parametrize("failure", ["full", "eio-once"])
def test_a_disk_failure_at_every_call_loses_no_answer_and_bills_none_twice(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, healthy_calls: int, failure: str) -> None:
    """Each write, fsync and truncation of the run fails in turn. ``full``: from that call
    on every call fails (the write first stores half of its bytes), the cut back too,
    until the space is back; ``eio-once``: that call alone fails with ``EIO``."""
    assert healthy_calls > 10

    async def run(at: int) -> None:
        disk = (FailingDisk(at) if failure == "full"
                else FailingDisk(at, error=errno.EIO, lasting=False, short=False))
        answers, ledger, tenant = await _outage_run(
            db_url, tmp_path / f"{failure}-{at}", disk, monkeypatch)
        try:
            assert disk.failures > 0, f"call {at}: nothing failed"
            counts = await rows(ledger)
            assert {rid: counts.get(rid) for rid in answers} == dict.fromkeys(answers, 1), \
                "an answered event lost"
            totals = (await ledger.usage_report(tenant))["totals"]
            assert totals["requests"] == len(answers)
            assert totals["cost_micros"] == sum(b.cost_micros for b in answers.values())
        finally:
            await ledger.close()

    with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
        for at in range(healthy_calls):
            try:
                asyncio.run(run(at))
            except AssertionError as exc:
                raise AssertionError(f"a failure from disk call {at} on: {exc}") from exc
    assert DAMAGED not in caplog.text


# -- real outages: the full disk, and admission resuming -----------------------------


class Database:
    """A ledger database to take away for real: SQLite's writer made read-only, or a
    PostgreSQL server of the test's own stopped (``pg_ctl stop -m immediate``)."""

    def __init__(self, url: str, pg: OwnPostgres | None) -> None:
        self.url, self.pg = url, pg

    async def away(self, ledger: Ledger) -> None:
        if self.pg is not None:
            self.pg.kill()
        else:
            await readonly_writer(ledger, True)

    async def back(self, ledger: Ledger) -> None:
        if self.pg is not None:
            self.pg.start()
        else:
            await readonly_writer(ledger, False)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        yield Database(f"sqlite:///{tmp_path / 'ledger.db'}", None)
        return
    pg = OwnPostgres()
    try:
        pg.start()
        yield Database(pg.url, pg)
    finally:
        pg.close()


async def test_a_torn_append_on_a_full_disk_loses_nothing_in_the_next_outage(
        database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reported case: the database away, 10 events spooled, the 11th append fills the
    disk 265 bytes into its line; replay; in the next outage the first event is appended
    where that fragment was. Every one of the 12 answers is billed, once."""
    ledger = await Ledger.open(database.url, spool_dir=tmp_path / "spool")
    tenant = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tenant))
    disk = FailingDisk()
    assert ledger.spool is not None
    ledger.spool.ops = disk
    await database.away(ledger)
    answered = [event(tenant) for _ in range(11)]
    with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
        for e in answered[:10]:
            assert (await ledger.record(e)).spooled
        assert ledger.spool_depth() == 10
        disk.room = 265
        assert (await ledger.record(answered[10])).spooled  # answered, held in memory
        assert len(ledger._committer.held) == 1 and ledger.refusing() is not None
        disk.heal()
        await database.back(ledger)
        await until(lambda: not ledger.spool_depth() and not ledger._committer.held,
                    "the spool and what was held replayed")
        await database.away(ledger)
        answered.append(event(tenant))
        assert (await ledger.record(answered[-1])).spooled
        await database.back(ledger)
        await until(lambda: not ledger.spool_depth(), "the next outage replayed")
    counts = await rows(ledger)
    assert [counts.get(e.request_id) for e in answered] == [1] * 12
    assert DAMAGED not in caplog.text
    await ledger.close()


class Clock:
    """The spool re-test timer's clock, driven by the test: ``sleep`` returns when
    ``advance`` reaches its deadline, and ``now`` is what the timer has waited in all."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def waiting(self) -> bool:
        return any(not fut.done() for _, fut in self._sleepers)

    def advance(self) -> None:
        """To the earliest deadline, waking its sleeper."""
        deadline, fut = min(((d, f) for d, f in self._sleepers if not f.done()),
                            key=lambda e: e[0])
        self.now = max(self.now, deadline)
        fut.set_result(None)


async def test_admission_resumes_within_5s_of_space_returning(
        database: Database, tmp_path: Path) -> None:
    """The database away and the disk full: the answered event is held, new requests are
    refused. Once the disk has room, the re-test timer admits again within 5 s of its own
    clock (no wall time is measured), the database still away; a refused request asks for
    a re-test itself, so the next one is admitted without waiting for the timer."""
    assert RETEST_S <= 2.5
    ledger = await Ledger.open(database.url, spool_dir=tmp_path / "spool")
    committer = ledger._committer
    clock = Clock()
    committer.sleep = clock.sleep
    tenant = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tenant))
    disk = FailingDisk(room=0)
    assert ledger.spool is not None
    ledger.spool.ops = disk
    await database.away(ledger)
    answered = [event(tenant)]
    assert (await ledger.record(answered[0])).spooled
    assert "No space left" in (ledger.refusing() or "")
    assert (await ledger.health()).refusing  # readiness fails too

    for _ in range(3):  # full for a while: every re-test fails, the refusal stays
        await until(clock.waiting, "the re-test timer waits")
        clock.advance()
    await until(clock.waiting, "the re-test timer waits")
    assert committer.spool_failing() and committer.held

    disk.heal()  # the disk has room again
    since = clock.now
    while committer.spool_failing():
        await until(lambda: clock.waiting() or not committer.spool_failing(),
                    "a re-test or the spool in use")
        if committer.spool_failing():
            clock.advance()
    assert 0 < clock.now - since <= 5.0  # the timer's doing, within 5 s
    assert ledger.refusing() is None and (await ledger.health()).refusing is None
    assert committer.unavailable is not None  # the database still away
    assert ledger.spool_depth() == 1 and not committer.held  # what was held is spooled
    answered.append(event(tenant))
    assert (await ledger.record(answered[-1])).spooled

    # Full again; this time a refused request asks for the re-test: no timer needed.
    disk.room = 0
    answered.append(event(tenant))
    assert (await ledger.record(answered[-1])).spooled and committer.held
    disk.heal()
    stopped = clock.now
    assert ledger.refusing() is not None  # this request is refused, and asks
    await until(lambda: not committer.spool_failing(), "the spool re-tested on request")
    assert ledger.refusing() is None and clock.now == stopped

    await database.back(ledger)
    await until(lambda: not ledger.spool_depth(), "the spool replayed")
    counts = await rows(ledger)
    assert [counts.get(e.request_id) for e in answered] == [1, 1, 1]
    await ledger.close()
