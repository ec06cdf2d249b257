"""Fixtures: real ``kvgate serve`` processes. Starting one costs seconds, so the tests that
need no special pool share one server for the whole session; fault tests start their own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import Admin, MiB, ProcessServer


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessServer]:
    with ProcessServer(tmp_path_factory.mktemp("kvgate-shared"),
                       device_cache_bytes=32 * MiB) as srv:
        yield srv


@pytest.fixture(scope="session")
def admin(server: ProcessServer) -> Admin:
    return server.admin


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
