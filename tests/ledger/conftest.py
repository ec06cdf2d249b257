"""Ledger fixtures: a fresh SQLite file and a fresh PostgreSQL database per test.

PostgreSQL is the real server (``KVGATE_TEST_PG_URL``, default the local ``test``
database, trust auth); each test gets its own ``CREATE DATABASE`` so migrations start
from nothing. Only an unreachable server skips, with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone

import asyncpg
import pytest

from gateway.ledger import Ledger, UsageEvent

PG_URL = os.environ.get("KVGATE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
_pg_error: list[str] = []  # reachability, probed once per session


def _pg_reachable() -> str | None:
    if not _pg_error:
        async def probe() -> None:
            conn = await asyncpg.connect(PG_URL, timeout=3)
            await conn.close()
        try:
            asyncio.run(probe())
            _pg_error.append("")
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            _pg_error.append(f"PostgreSQL at {PG_URL} unreachable: {exc!r}")
    return _pg_error[0] or None


def _pg_admin(sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(run())


@pytest.fixture
def pg_url() -> Iterator[str]:
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    name = f"kvgate_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_url)
    try:
        yield led
    finally:
        await led.close()


_ids = itertools.count()
NOW = datetime(2026, 3, 14, 12, 0, tzinfo=timezone.utc)


def event(tenant_id: int, key_id: int | None = None, *, request_id: str | None = None,
          prompt: int = 100, cached: int = 0, w5m: int = 0, w1h: int = 0,
          completion: int = 10, model: str = "demo", started_at: datetime = NOW,
          status: str = "ok") -> UsageEvent:
    return UsageEvent(
        request_id=request_id or f"req-{next(_ids)}-{uuid.uuid4().hex[:8]}",
        tenant_id=tenant_id, key_id=key_id, model=model, endpoint="chat.completions",
        prompt_tokens=prompt, cached_tokens=cached, cache_write_5m_tokens=w5m,
        cache_write_1h_tokens=w1h, completion_tokens=completion, status=status,
        started_at=started_at, finished_at=started_at, ttft_ms=12)
