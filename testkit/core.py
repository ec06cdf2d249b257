"""For tests of the engine core process (``--api-servers 1``): the in-process server's
``EngineClient``, and waiting for what a restart brings about."""

from __future__ import annotations

import time
from collections.abc import Callable

from kvgate.gateway.engine.client import EngineClient
from testkit.server import ThreadServer


def client_of(srv: ThreadServer) -> EngineClient:
    """The server's engine, which must be the client of a core process."""
    engine = srv.state.engine
    assert isinstance(engine, EngineClient), "the server runs its engine in this process"
    return engine


def wait_until(what: Callable[[], object], timeout_s: float = 120.0) -> None:
    """Until ``what()`` is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting")
        time.sleep(0.02)
