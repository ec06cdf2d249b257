"""Console tests: the ledger's series on SQLite and PostgreSQL (the ledger tests' fixtures),
the admin endpoints and the page on a real server, and the page in a real Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from testkit import Admin, MiB, Tenant, ThreadServer
from testkit.browser import find_chromium
from testkit.ci import cannot_run
from tests.ledger.conftest import db_url, ledger, sqlite_url  # noqa: F401  (fixtures)
from tests.pg import pg_url  # noqa: F401  (a fixture)

SYSTEM = "You answer questions about the kvgate console. " * 12  # several cached blocks
XSS_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    with ThreadServer(tmp_path_factory.mktemp("console-ledger"), device="cpu",
                      device_cache_bytes=16 * MiB, host_cache_bytes=16 * MiB,
                      default_max_tokens=4) as srv:
        yield srv


@pytest.fixture(scope="session")
def admin(server: ThreadServer) -> Admin:
    return server.admin


@pytest.fixture(scope="session")
def model_id(server: ThreadServer) -> str:
    model: str = server.state.engine.model_id
    return model


def chat(server: ThreadServer, tenant: Tenant, model_id: str, n: int) -> None:
    """``n`` chat completions through the official SDK, all with one long system prompt, so
    every one after the first reads most of its prompt from the cache."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)
    try:
        for i in range(n):
            client.chat.completions.create(model=model_id, max_tokens=2, messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"question {i}"}])
    finally:
        client.close()


@dataclass
class Workload:
    busy: Tenant
    quiet: Tenant
    hostile: Tenant


@pytest.fixture(scope="session")
def workload(server: ThreadServer, admin: Admin, model_id: str) -> Workload:
    """A scripted workload: ``busy`` sends four requests (three cache hits), ``quiet`` one,
    and a tenant whose name is markup sends one."""
    busy, quiet = admin.tenant("busy"), admin.tenant("quiet")
    hostile = admin.tenant(name=XSS_NAME)
    chat(server, busy, model_id, 4)
    chat(server, quiet, model_id, 1)
    chat(server, hostile, model_id, 1)
    return Workload(busy, quiet, hostile)


# -- the browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """The system's Chromium driven by Playwright (no browser download). Outside CI it skips,
    saying why, only where no browser can run; in CI (``CI=true``, where ``.ci/run``
    installs Chromium) a browser that cannot run fails the test instead. Per module:
    Playwright's sync API holds an event loop on this thread while it runs, which asyncio
    tests after it must not find."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        cannot_run("Playwright is not installed (pip install -e '.[test]')")
    exe = find_chromium()
    if exe is None:
        cannot_run("no Chromium found (Debian: apt-get install chromium; or set "
                    "KVGATE_TEST_CHROMIUM to a Chromium or Chrome binary)")
    pw = sync_playwright().start()
    try:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        try:
            b = pw.chromium.launch(executable_path=exe, args=args)
        except Error as exc:
            cannot_run(f"Chromium at {exe} cannot start here: {exc}")
        yield b
        b.close()
    finally:
        pw.stop()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``KVGATE_CONSOLE_SHOTS`` when set, else a temporary folder
    (the test artifacts)."""
    target = os.environ.get("KVGATE_CONSOLE_SHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        return Path(target)
    return tmp_path_factory.mktemp("console-screenshots")
