"""Ledger fixtures: a fresh SQLite file and a fresh PostgreSQL database per test
(``pg_url``, from ``tests/pg.py``: the real server; only an unreachable one skips)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from kvgate.gateway.ledger import Ledger, UsageEvent
from kvgate.gateway.usage import Usage
from tests.pg import pg_url  # noqa: F401  (a fixture)


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
NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)


def event(tenant_id: int, key_id: int | None = None, *, request_id: str | None = None,
          prompt: int = 100, cached: int = 0, w5m: int = 0, w1h: int = 0,
          completion: int = 10, model: str = "demo", started_at: datetime = NOW,
          status: str = "ok") -> UsageEvent:
    return UsageEvent(
        request_id=request_id or f"req-{next(_ids)}-{uuid.uuid4().hex[:8]}",
        tenant_id=tenant_id, key_id=key_id, model=model, endpoint="chat.completions",
        usage=Usage(prompt, cached, {300: w5m, 3600: w1h}, completion), status=status,
        started_at=started_at, finished_at=started_at, ttft_ms=12)
