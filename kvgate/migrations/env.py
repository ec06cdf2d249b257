"""Alembic environment for the kvgate ledger.

kvgate runs this programmatically (``kvgate.gateway.ledger.migrate``) and hands over an open
connection in ``config.attributes["connection"]``; the plain ``alembic -c
kvgate/migrations/alembic.ini`` command works too and reads the URL from ``KVGATE_DB``.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from kvgate.gateway.ledger.db import async_url, create_engine
from kvgate.gateway.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return os.environ.get("KVGATE_DB") or config.get_main_option("sqlalchemy.url") \
        or "sqlite:///./kvgate.db"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTERs by copy
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_url())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=async_url(_url()).replace("+aiosqlite", "").replace("+asyncpg", ""),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    _run(shared)
else:
    asyncio.run(_run_async())
