"""One real server for the whole tests/http session: real Engine (demo model), real Ledger
(SQLite in a temp dir), in this process (``ThreadServer``), so tests can reach its engine
and sync SDK clients, async SDK clients and pytest-asyncio tests can all talk to it.

A module marked ``both_engines`` runs its tests twice: against that server, and against
one whose engine core runs in a process of its own (``--api-servers 1``, the default of
``kvgate serve`` on two or more cores): what a client sees must not depend on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit import Admin, MiB, Session, Tenant, ThreadServer

HTTP_FLAGS = {
    "device": "cpu", "device_cache_bytes": 16 * MiB, "host_cache_bytes": 16 * MiB,
    "max_running": 8, "max_queue": 32, "default_max_tokens": 8, "max_body_bytes": 256 * 1024,
}


ENGINES = {"in-process": 0, "core-process": 1}  # --api-servers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_engines: run against the engine in this process "
                                       "and against the engine core process")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
            "both_engines"):
        metafunc.parametrize("server", list(ENGINES), indirect=True, scope="session")


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    mode = getattr(request, "param", "in-process")
    with ThreadServer(tmp_path_factory.mktemp("ledger"), api_servers=ENGINES[mode],
                      **HTTP_FLAGS) as srv:
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
