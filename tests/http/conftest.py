"""One real server for the whole tests/http session: real Engine (demo model), real Ledger
(SQLite in a temp dir), aiohttp on a loopback port, in a thread with its own event loop so
sync SDK clients, async SDK clients and pytest-asyncio tests can all talk to it."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from gateway.config import Settings
from gateway.http import create_app
from gateway.http.state import STATE

ADMIN_KEY = "kvg_test_admin_key_0123456789"
_names = itertools.count()


class ServerThread:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.app = create_app(settings)
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kvgate-test-server",
                                        daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app, shutdown_timeout=5)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Any:
        return self.app[STATE]


@dataclass
class Tenant:
    id: int
    name: str
    key: str
    key_id: int


class Session(requests.Session):
    """requests with a base URL, so tests write paths only."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.base_url = base_url
        self.headers.update(headers or {})

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 60)
        return super().request(method, self.base_url + url, *args, **kwargs)


class Admin:
    """The operator's side, over HTTP: create tenants and keys, read usage."""

    def __init__(self, url: str) -> None:
        self.http = Session(url, {"Authorization": f"Bearer {ADMIN_KEY}"})

    def tenant(self, **fields: Any) -> Tenant:
        name = fields.pop("name", None) or f"t{next(_names)}"
        r = self.http.post("/admin/tenants", json={"name": name, **fields})
        assert r.status_code == 201, r.text
        t = r.json()
        k = self.http.post(f"/admin/tenants/{t['id']}/keys")
        assert k.status_code == 201, k.text
        return Tenant(t["id"], name, k.json()["key"], k.json()["id"])

    def usage(self, tenant_id: int) -> dict:
        r = self.http.get("/admin/usage", params={"tenant_id": tenant_id})
        assert r.status_code == 200, r.text
        return r.json()["totals"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    db = Path(tmp_path_factory.mktemp("ledger")) / "kvgate.db"
    settings = Settings(
        host="127.0.0.1", port=0, model="demo", db=f"sqlite:///{db}", device="cpu",
        admin_key=ADMIN_KEY, device_cache_bytes=16 * 1024 * 1024,
        host_cache_bytes=16 * 1024 * 1024, max_running=8, max_queue=32,
        default_max_tokens=8, max_body_bytes=256 * 1024)
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def admin(server: ServerThread) -> Iterator[Admin]:
    a = Admin(server.url)
    yield a
    a.http.close()


@pytest.fixture(scope="session")
def model_id(server: ServerThread) -> str:
    return server.state.engine.model_id


@pytest.fixture()
def tenant(admin: Admin) -> Tenant:
    """A fresh tenant per test, so cache and usage assertions never see another test."""
    return admin.tenant()


@pytest.fixture()
def http(server: ServerThread) -> Iterator[Session]:
    s = Session(server.url)
    yield s
    s.close()
