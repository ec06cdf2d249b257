"""Database URLs and engines: one async engine per ledger, durable settings on SQLite."""

from __future__ import annotations

import logging
import os
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import InvalidInput, LedgerFileLost

log = logging.getLogger("kvgate.ledger")

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
    # A database that does not answer is "unavailable" within seconds, not after asyncpg's
    # default minute: usage then goes to the spool and key lookups answer 503.
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                               pool_timeout=5, connect_args={"timeout": 5})


def migrates_on_start(url: str) -> bool:
    """What ``serve`` passes as ``Ledger.open(url, migrate=...)``: a SQLite file belongs to
    one process and is upgraded in place; a PostgreSQL ledger is shared by replicas, so
    its schema moves only by an explicit ``kvgate migrate``."""
    return async_url(url).startswith("sqlite")


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL; None for PostgreSQL and in-memory SQLite."""
    parsed = make_url(async_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


class SqliteFile:
    """The identity (device, inode) of the ledger's SQLite file when it was opened.

    ``check`` (one ``stat``) raises ``LedgerFileLost`` once the path names another file or
    none: the connections would go on writing into an unlinked file that nobody will read.
    Lost stays lost (logged once, naming the path) until the process restarts.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)
        self.lost: str | None = None

    def check(self) -> None:
        if self.lost is None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) != self._ident:
                    self.lost = f"the ledger file {self.path} was replaced by another file"
            except FileNotFoundError:
                self.lost = f"the ledger file {self.path} was deleted"
            except OSError as exc:
                self.lost = f"the ledger file {self.path} cannot be checked: {exc}"
            if self.lost is not None:
                log.error("%s while the server runs; refusing requests and keeping usage in "
                          "the spool until a restart on the right file", self.lost)
        if self.lost is not None:
            raise LedgerFileLost(self.lost)
