"""One real server for the whole tests/http session: real Engine (demo model), real Ledger
(SQLite in a temp dir), in this process (``ThreadServer``), so tests can reach its engine
and sync SDK clients, async SDK clients and pytest-asyncio tests can all talk to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit import Admin, MiB, Session, Tenant, ThreadServer

HTTP_FLAGS = {
    "device": "cpu", "device_cache_bytes": 16 * MiB, "host_cache_bytes": 16 * MiB,
    "max_running": 8, "max_queue": 32, "default_max_tokens": 8, "max_body_bytes": 256 * 1024,
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("ledger"), **HTTP_FLAGS) as srv:
        yield srv


@pytest.fixture(scope="session")
def admin(server: ThreadServer) -> Admin:
    return server.admin


@pytest.fixture(scope="session")
def model_id(server: ThreadServer) -> str:
    model: str = server.state.engine.model_id
    return model


@pytest.fixture()
def tenant(admin: Admin) -> Tenant:
    """A fresh tenant per test, so cache and usage assertions never see another test."""
    return admin.tenant()


@pytest.fixture()
def http(server: ThreadServer) -> Iterator[Session]:
    s = Session(server.url)
    yield s
    s.close()
