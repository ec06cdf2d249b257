"""The usage spool: while the database cannot take usage, ``record`` answers from a local
fsync'd file, and a background task (or the next start) replays it into the database,
exactly once. The one fault injected by hand is ``readonly_writer``: the SQLite writer's
connection reopened read-only, so the file refuses writes as a read-only disk would."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from kvgate.gateway.ledger import Ledger, LedgerFileLost, LedgerUnavailable, cost_micros
from kvgate.gateway.ledger.auth import KeyCache, Principal
from kvgate.gateway.ledger.billing import DEFAULT_PRICES
from kvgate.gateway.ledger.spool import Spool, SpoolRecord, decode, encode
from tests.ledger.conftest import event
from tests.ledger.pgserver import OwnPostgres


async def rows(ledger: Ledger) -> dict[str, int]:
    """request id -> how many usage rows it has."""
    from kvgate.gateway.ledger.models import UsageRow

    async with ledger.engine.connect() as conn:
        return dict((await conn.execute(select(UsageRow.request_id, func.count())
                                        .group_by(UsageRow.request_id))).all())


async def readonly_writer(ledger: Ledger, on: bool) -> None:
    """Fault injection: the SQLite writer thread's connection becomes a read-only one (on)
    or is dropped so the next batch reconnects normally (off)."""
    writer = ledger._committer._writer
    assert writer is not None

    def swap() -> None:
        if writer._conn is not None:
            writer._conn.close()
        writer._conn = (sqlite3.connect(f"file:{writer.path}?mode=ro", uri=True,
                                        isolation_level=None) if on else None)
    await asyncio.get_running_loop().run_in_executor(writer._pool, swap)


async def until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(600):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


# -- the file format -------------------------------------------------------------------


def test_a_torn_last_line_is_cut_and_earlier_lines_kept(tmp_path: Path) -> None:
    good = [SpoolRecord(event(1), None), SpoolRecord(event(2), None)]
    data = b"".join(encode(r) for r in good)
    torn = encode(SpoolRecord(event(3), None))[:-7]
    records, end = decode(data + torn)
    assert [r.event for r in records] == [r.event for r in good] and end == len(data)
    damaged = bytearray(encode(SpoolRecord(event(4), None)))
    damaged[30] ^= 0x01  # a flipped bit inside a complete line: its checksum fails
    records, _ = decode(data + bytes(damaged) + encode(good[0]))
    assert [r.event.request_id for r in records] == [good[0].event.request_id,
                                                     good[1].event.request_id,
                                                     good[0].event.request_id]


async def test_reopening_cuts_a_torn_tail_and_adopts_dead_files(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    first = [SpoolRecord(event(1), None)]
    (spool_dir / "usage-0.spool").write_bytes(encode(first[0]) + b"0badc0de 99 {\"tor")
    (spool_dir / "usage-7.spool").write_bytes(encode(SpoolRecord(event(2), None)))
    spool = Spool(spool_dir)
    await spool.open()
    assert spool.depth == 2 and spool.path == spool_dir / "usage-0.spool"
    assert sorted(p.name for p in spool_dir.iterdir()) == ["usage-0.spool"]
    await spool.append([SpoolRecord(event(3), None)])
    records, _ = await spool.read()
    assert len(records) == 3 and spool.depth == 3
    other = Spool(spool_dir)  # a second live process takes another file
    await other.append([SpoolRecord(event(4), None)])
    assert other.path == spool_dir / "usage-1.spool"
    await other.close()
    await spool.close()


# -- SQLite whose writes start failing ---------------------------------------------------


async def test_sqlite_refusing_writes_spools_then_replays_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    spool_dir = tmp_path / "spool"
    ledger = await Ledger.open(url, spool_dir=spool_dir)
    tenant = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tenant))  # the prices of the tenant are known from here
    await readonly_writer(ledger, True)
    spooled = [event(tenant, prompt=1000, completion=50) for _ in range(3)]
    answers = [await ledger.record(e) for e in spooled]
    assert all(b.spooled and b.new for b in answers)
    assert [b.cost_micros for b in answers] == [cost_micros(e.usage, DEFAULT_PRICES)
                                                for e in spooled]
    assert ledger.spool_depth() == 3 and ledger.refusing() is None
    assert not set(await rows(ledger)) & {e.request_id for e in spooled}

    await readonly_writer(ledger, False)  # the disk is writable again
    await until(lambda: ledger.spool_depth() == 0, "the spool replayed")
    counts = await rows(ledger)
    assert [counts.get(e.request_id) for e in spooled] == [1, 1, 1]
    assert (await ledger.usage_report(tenant))["totals"]["cost_micros"] == \
        sum(b.cost_micros for b in answers) + cost_micros(event(tenant).usage, DEFAULT_PRICES)
    assert (await ledger.record(event(tenant))).spooled is False
    await ledger.close()


async def test_a_crash_between_commit_and_spool_truncation_bills_once(tmp_path: Path) -> None:
    """The spool still holds events the database already has: replay adds nothing."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = await Ledger.open(url)
    tenant = (await ledger.create_tenant("acme"))["id"]
    events = [event(tenant) for _ in range(3)]
    for e in events[:2]:
        await ledger.record(e)  # committed, yet still in the spool below
    await ledger.close()
    spool = Spool(tmp_path / "spool")
    await spool.append([SpoolRecord(e, None) for e in events])
    await spool.close()  # the process dies with its file: the next one adopts it

    ledger = await Ledger.open(url, spool_dir=tmp_path / "spool")
    await until(lambda: ledger.spool_depth() == 0, "the spool replayed on start")
    assert [(await rows(ledger)).get(e.request_id) for e in events] == [1, 1, 1]
    await ledger.close()


async def test_bound_spool_refuses_admission(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = await Ledger.open(url, spool_dir=tmp_path / "spool", spool_max_events=2)
    tenant = (await ledger.create_tenant("acme"))["id"]
    await readonly_writer(ledger, True)
    await ledger.record(event(tenant))
    assert ledger.refusing() is None
    await ledger.record(event(tenant))
    assert "spool holds 2 events" in (ledger.refusing() or "")
    health = await ledger.health()
    assert health.refusing and health.spool_events == 2
    await readonly_writer(ledger, False)
    await until(lambda: ledger.refusing() is None, "admitting again")
    await ledger.close()


# -- the SQLite file replaced or deleted ------------------------------------------------


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_replaced_sqlite_file_is_never_written(tmp_path: Path, how: str) -> None:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    ledger = await Ledger.open(url, spool_dir=tmp_path / "spool")
    tenant = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tenant))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if how == "replaced":
        sqlite3.connect(path).close()  # an empty file of the same name
    late = event(tenant)
    billed = await ledger.record(late)
    assert billed.spooled and ledger.spool_depth() == 1
    assert str(path) in (ledger.refusing() or "")
    health = await ledger.health()
    assert health.database == "lost" and health.refusing
    with pytest.raises(LedgerFileLost):
        await ledger.authenticate("kvg_anything")
    with pytest.raises(LedgerUnavailable):
        await ledger.list_tenants()
    if how == "replaced":
        assert os.path.getsize(path) == 0  # nothing went into the new file either
    await ledger.close()


# -- key lookups with the database away --------------------------------------------------


async def test_key_cache_grace_never_revives_a_dropped_key() -> None:
    now = [0.0]
    cache = KeyCache(ttl_s=1.0, grace_s=60.0, clock=lambda: now[0])
    alice = Principal(1, "tenant", 1, "a", "active", 300, None, None, None, None, 1)
    up = [True]

    async def load(digest: str) -> Principal | None:
        if not up[0]:
            raise LedgerUnavailable("down")
        return alice if digest == "alice" else None

    assert await cache.get("alice", load) is alice
    assert await cache.get("mallory", load) is None
    up[0], now[0] = False, 30.0
    assert await cache.get("alice", load) is alice  # within the grace
    assert await cache.get("mallory", load) is None  # a miss stays a miss
    with pytest.raises(LedgerUnavailable):
        await cache.get("bob", load)  # never seen: 503
    cache.invalidate("alice")  # revoked on this replica
    with pytest.raises(LedgerUnavailable):
        await cache.get("alice", load)
    up[0] = True
    assert await cache.get("alice", load) is alice
    up[0], now[0] = False, 100.0  # past the grace
    with pytest.raises(LedgerUnavailable):
        await cache.get("alice", load)


# -- PostgreSQL stopped under the ledger --------------------------------------------------


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


async def test_postgres_killed_spools_and_replays_once(own_pg: OwnPostgres,
                                                       tmp_path: Path) -> None:
    ledger = await Ledger.open(own_pg.url, spool_dir=tmp_path / "spool")
    tenant = (await ledger.create_tenant("acme"))["id"]
    await ledger.record(event(tenant))
    own_pg.kill()
    spooled = [event(tenant) for _ in range(2)]
    assert [(await ledger.record(e)).spooled for e in spooled] == [True, True]
    assert ledger.spool_depth() == 2 and (await ledger.health()).database == "down"
    with pytest.raises(LedgerUnavailable):
        await ledger.authenticate("kvg_never_seen")
    own_pg.start()
    await until(lambda: ledger.spool_depth() == 0, "the spool replayed")
    assert [(await rows(ledger)).get(e.request_id) for e in spooled] == [1, 1]
    await ledger.close()
