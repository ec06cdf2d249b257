"""A fresh PostgreSQL database per test, on the real server.

``KVGATE_TEST_PG_URL`` (default the local ``test`` database, trust auth) names the server;
each test gets its own ``CREATE DATABASE`` so migrations start from nothing. Only an
unreachable server skips, with the reason.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from testkit.ci import cannot_run

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
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
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
        cannot_run(reason)
    name = f"kvgate_test_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
