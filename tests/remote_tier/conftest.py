"""A real redis-server of the test's own, on a free loopback port (never a shared one).

It is started as an operator would start Valkey for the remote tier: no persistence, a
``maxmemory`` with LRU eviction. Tests that need it skip, saying why, where the binary is
missing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.ci import cannot_run
from testkit.redis_server import RedisServer, missing

__all__ = ["RedisServer", "valkey"]


@pytest.fixture
def valkey() -> Iterator[RedisServer]:
    reason = missing()
    if reason:
        cannot_run(reason)
    server = RedisServer(maxmemory="64mb").start()
    try:
        yield server
    finally:
        server.stop()
