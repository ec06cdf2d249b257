"""SIGKILL a process in the middle of recording: nothing it acknowledged is lost or doubled."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

from sqlalchemy import func, select

from kvgate.gateway.ledger import Ledger
from kvgate.gateway.ledger.models import UsageRow

CHILD = Path(__file__).with_name("crash_child.py")


async def test_sigkill_loses_no_acknowledged_event(db_url: str) -> None:
    setup = await Ledger.open(db_url)
    tenant_id = (await setup.create_tenant("victim"))["id"]
    await setup.close()

    acked: list[str] = []
    delays = [random.uniform(0.05, 1.0) for _ in range(2)]  # two kills, two random moments
    for delay in delays:
        acked += await _record_until_killed(db_url, tenant_id, delay)

    ledger = await Ledger.open(db_url, migrate=False)
    try:
        async with ledger.engine.connect() as conn:
            counts = dict((await conn.execute(
                select(UsageRow.request_id, func.count()).group_by(UsageRow.request_id)
            )).all())
            if ledger.dialect == "sqlite":
                check = (await conn.exec_driver_sql("PRAGMA integrity_check")).scalar()
                assert check == "ok"
        missing = [rid for rid in acked if counts.get(rid) != 1]
        assert missing == [], f"killed after {delays}s: {len(missing)} acknowledged " \
                              f"events missing or doubled"
        assert all(n == 1 for n in counts.values())
        assert len(counts) >= len(acked)  # committed but not yet printed is fine
        t = (await ledger.usage_report(tenant_id=tenant_id))["totals"]
        assert t["requests"] == len(counts)
        assert t["cost_micros"] == len(counts) * 106  # 64 + 2 + 20 + 20 per event
    finally:
        await ledger.close()


async def _record_until_killed(db_url: str, tenant_id: int, delay: float) -> list[str]:
    """Start the child, let it record for ``delay`` seconds, SIGKILL it; the ids it had
    printed (each after its ``record`` returned) are the acknowledged ones."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), db_url, str(tenant_id), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    acked: list[str] = []
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        acked.append(first.decode().strip())
        await asyncio.sleep(delay)  # a random moment, mid-batch or mid-commit
    finally:
        proc.send_signal(signal.SIGKILL)
    rest = await proc.stdout.read()  # whatever it wrote before dying
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    acked += rest.decode().split("\n")[:-1]  # the last piece has no newline: unfinished
    assert len(acked) > 1
    return acked
