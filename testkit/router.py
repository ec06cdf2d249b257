"""``kvgate route`` in a thread of the test process, on a loopback port the OS picks."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from kvgate.gateway.route.settings import RouterSettings
from testkit.admin import EVENTS_SECRET


class RouterThread:
    def __init__(self, **settings: Any) -> None:
        self.settings = RouterSettings.from_env({}, **{"port": 0, "log_level": "warning",
                                                       "model": "demo",
                                                       "events_secret": EVENTS_SECRET,
                                                       **settings})
        self.port = 0
        self.app: web.Application | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def router(self) -> Any:
        from kvgate.gateway.route.app import ROUTER

        assert self.app is not None
        return self.app[ROUTER]

    def on_loop(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> RouterThread:
        from kvgate.gateway.route.app import create_router_app

        self.app = create_router_app(self.settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="kvgate-test-router",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the router did not start")
        return self

    def _main(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from kvgate.gateway.edge.transport import GatewayRunner

        assert self.app is not None
        self._stop = asyncio.Event()
        runner = GatewayRunner(self.app, shutdown_timeout=5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
        self._thread = None

    def __enter__(self) -> RouterThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
