"""The usage checkpoint journal on real files: what a restart bills, and what it never bills."""

from __future__ import annotations

import asyncio
import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path

from kvgate.gateway.ledger.billing import UsageEvent
from kvgate.gateway.ledger.checkpoints import Checkpoints, read_journal
from kvgate.gateway.usage import Usage


def event(rid: str, completion: int) -> UsageEvent:
    now = datetime.now(UTC)
    return UsageEvent(request_id=rid, tenant_id=1, key_id=2, model="demo",
                      endpoint="/v1/chat/completions", usage=Usage(10, 4, {300: 6}, completion),
                      status="interrupted", started_at=now, finished_at=now, ttft_ms=5,
                      receipt_id=f"rcpt_{rid}")


class Running:
    """A request's usage as the journal sees it (its snapshot function)."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.tokens = 0

    def __call__(self) -> UsageEvent | None:
        return event(self.rid, self.tokens) if self.tokens else None


def journals(directory: Path) -> list[Path]:
    return sorted(directory.glob("checkpoints-*.journal"))


async def test_a_stopped_process_leaves_its_running_requests_to_the_next_start(tmp_path):
    cp = Checkpoints(tmp_path, interval_s=3600)
    assert await cp.recover() == []
    a, b, c = Running("a"), Running("b"), Running("c")
    for r in (a, b, c):
        cp.track(r.rid, r)
    a.tokens, b.tokens = 70, 5  # c has no first token yet: nothing to bill
    assert await cp.flush() == 2
    a.tokens = 140
    assert await cp.flush() == 1
    assert await cp.flush() == 0  # nothing moved: nothing written
    cp.finish("b")  # billed normally
    await cp.flush()
    # a crash now: nothing closes the journal; a new process adopts it
    os.close(cp._fd)  # the kernel drops the lock when a process dies
    cp._fd = None
    again = Checkpoints(tmp_path)
    found = {e.request_id: e for e in await again.recover()}
    assert set(found) == {"a"}
    assert found["a"].status == "interrupted" and found["a"].usage.completion_tokens == 140
    assert found["a"].usage.cached_tokens == 4 and found["a"].receipt_id == "rcpt_a"
    again.forget_recovered()
    assert journals(tmp_path) == []
    await again.close()


async def test_a_request_is_journalled_at_its_first_token_not_after_the_interval(tmp_path):
    """A replica killed in a stream's first second must still bill the prompt: tracking a
    request wakes the flusher, however long the interval."""
    cp = Checkpoints(tmp_path, interval_s=3600)
    await cp.recover()
    first = Running("first")
    first.tokens = 1
    cp.track(first.rid, first)
    for _ in range(400):  # the flush runs on its own task; nothing here waits an interval
        if journals(tmp_path) and "first" in read_journal(journals(tmp_path)[0].read_bytes()):
            break
        await asyncio.sleep(0.025)
    (path,) = journals(tmp_path)
    found = read_journal(path.read_bytes())
    assert found["first"].usage.prompt_tokens == 10 and found["first"].status == "interrupted"
    cp.finish("first")
    await cp.close()


async def test_a_live_process_journal_is_not_adopted(tmp_path):
    cp = Checkpoints(tmp_path, interval_s=3600)
    await cp.recover()
    r = Running("x")
    cp.track("x", r)
    r.tokens = 3
    await cp.flush()
    other = Checkpoints(tmp_path)
    assert await other.recover() == []  # its lock is held
    await other.close()
    cp.finish("x")
    await cp.flush()
    await cp.close()
    assert journals(tmp_path) == []  # a clean stop with nothing running leaves no file


async def test_a_torn_tail_and_damaged_lines_hide_nothing_else(tmp_path):
    cp = Checkpoints(tmp_path, interval_s=3600)
    await cp.recover()
    runs = [Running(f"r{i}") for i in range(3)]
    for r in runs:
        cp.track(r.rid, r)
        r.tokens = 10
    await cp.flush()
    path = journals(tmp_path)[0]
    os.close(cp._fd)
    cp._fd = None
    data = path.read_bytes()
    lines = [line.replace(b'"completion_tokens":10', b'"completion_tokens":99')
             if b'"request_id":"r1"' in line else line for line in data.split(b"\n")]
    path.write_bytes(b"\n".join(lines) + b"7a3f 12 {\"done\"")  # a torn append at the end
    found = read_journal(path.read_bytes())
    assert set(found) == {"r0", "r2"}  # the altered line fails its checksum, alone


async def test_a_request_whose_bill_failed_survives_compaction_and_a_clean_stop(tmp_path,
                                                                                monkeypatch):
    monkeypatch.setattr("kvgate.gateway.ledger.checkpoints._COMPACT_BYTES", 2000)
    cp = Checkpoints(tmp_path, interval_s=3600)
    await cp.recover()
    lost, busy = Running("lost"), Running("busy")
    cp.track("lost", lost)
    cp.track("busy", busy)
    lost.tokens = busy.tokens = 1
    await cp.flush()
    cp.finish("lost", billed=False)  # the ledger refused it: bill it at the next start
    for n in range(2, 40):  # enough lines to compact several times
        busy.tokens = n
        await cp.flush()
    assert journals(tmp_path)[0].stat().st_size < 4000
    cp.finish("busy")
    await cp.flush()
    await cp.close()
    (path,) = journals(tmp_path)  # kept: "lost" is still owed
    assert set(read_journal(path.read_bytes())) == {"lost"}
    nxt = Checkpoints(tmp_path)
    assert [e.request_id for e in await nxt.recover()] == ["lost"]
    await nxt.close()


async def test_a_failed_write_leaves_no_torn_line(tmp_path, monkeypatch):
    cp = Checkpoints(tmp_path, interval_s=3600)
    await cp.recover()
    r = Running("w")
    cp.track("w", r)
    r.tokens = 1
    await cp.flush()
    size = journals(tmp_path)[0].stat().st_size
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    r.tokens = 2
    try:
        await cp.flush()
        raise AssertionError("the write should have failed")
    except OSError:
        pass
    monkeypatch.setattr(os, "write", real_write)
    assert journals(tmp_path)[0].stat().st_size == size  # cut back to the last whole line
    assert await cp.flush() == 1  # retried once the disk has room
    assert read_journal(journals(tmp_path)[0].read_bytes())["w"].usage.completion_tokens == 2
    fd = os.open(journals(tmp_path)[0], os.O_RDONLY)
    try:  # still this process's: locked
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the journal's lock was lost")
        except OSError:
            pass
    finally:
        os.close(fd)
    cp.finish("w")
    await cp.close()


async def test_a_bill_held_in_memory_is_journalled_whole_with_its_status(tmp_path):
    """The spool's disk failed: the ledger holds the final event in memory only. The
    journal writes that event, so a crash now bills it at the next start, as it was."""
    cp = Checkpoints(tmp_path, interval_s=3600)
    await cp.recover()
    r = Running("h")
    cp.track("h", r)
    r.tokens = 5
    await cp.flush()
    final = event("h", 9)
    final = UsageEvent(**{**final.__dict__, "status": "ok"})
    cp.finish("h", billed=False, final=final)
    await cp.flush()
    os.close(cp._fd)  # the crash
    cp._fd = None
    nxt = Checkpoints(tmp_path)
    (got,) = await nxt.recover()
    assert (got.status, got.usage.completion_tokens) == ("ok", 9)
    await nxt.close()


async def test_journals_have_names_no_other_process_holds_and_stay_private(tmp_path, monkeypatch):
    """Replicas on one volume may all be pid 1 and start in the same second: each journal
    still has its own name; a compacted one keeps mode 0600."""
    monkeypatch.setattr("kvgate.gateway.ledger.checkpoints._COMPACT_BYTES", 1500)
    a, b = Checkpoints(tmp_path, interval_s=3600), Checkpoints(tmp_path, interval_s=3600)
    await a.recover()
    await b.recover()
    ra, rb = Running("a"), Running("b")
    a.track("a", ra)
    b.track("b", rb)
    for n in range(1, 30):
        ra.tokens = rb.tokens = n
        await a.flush()
        await b.flush()
    paths = journals(tmp_path)
    assert len(paths) == 2
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths)
    assert {next(iter(read_journal(p.read_bytes()))) for p in paths} == {"a", "b"}
    a.finish("a")
    b.finish("b")
    await a.close()
    await b.close()
