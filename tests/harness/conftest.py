"""Fixtures: real ``kvgate serve`` processes. Starting one costs seconds, so the tests that
need no special pool share one server for the whole session; fault tests start their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.server import Admin, KvgateServer


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KvgateServer]:
    with KvgateServer(tmp_path_factory.mktemp("kvgate-shared"),
                      device_cache_bytes=32 * 1024 * 1024) as srv:
        yield srv


@pytest.fixture(scope="session")
def admin(server: KvgateServer) -> Admin:
    return Admin(server)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
