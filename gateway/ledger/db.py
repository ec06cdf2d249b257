"""Database URLs and engines: one async engine per ledger, durable settings on SQLite."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import InvalidInput

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
                  "postgres": "postgresql+asyncpg"}


def async_url(url: str) -> str:
    """``sqlite:///x.db`` → ``sqlite+aiosqlite:///x.db``; ``postgresql://`` → asyncpg.

    Users write the plain URL; the ledger always talks through the async drivers.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidInput(f"not a database URL: {url!r} (use sqlite:///PATH or "
                           "postgresql://USER@HOST/DB)")
    if scheme in _ASYNC_DRIVERS:
        scheme = _ASYNC_DRIVERS[scheme]
    if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise InvalidInput(f"unsupported database URL scheme {scheme!r}: use sqlite:// or "
                           "postgresql:// (also sqlite+aiosqlite://, postgresql+asyncpg://)")
    return f"{scheme}://{rest}"


# WAL lets readers run beside the one writer; synchronous=FULL fsyncs the WAL at every
# COMMIT, which is what makes a returned ``record`` survive a power cut.
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL",
                  "PRAGMA foreign_keys=ON", "PRAGMA busy_timeout=10000")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in SQLITE_PRAGMAS:
        cur.execute(pragma)
    cur.close()


def create_engine(url: str) -> AsyncEngine:
    url = async_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def migrates_on_start(url: str) -> bool:
    """What ``serve`` passes as ``Ledger.open(url, migrate=...)``: a SQLite file belongs to
    one process and is upgraded in place; a PostgreSQL ledger is shared by replicas, so
    its schema moves only by an explicit ``kvgate migrate``."""
    return async_url(url).startswith("sqlite")
