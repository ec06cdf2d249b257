"""The real ``kvgate serve`` as a child process, and small clients for its admin API and SSE.

The harness proves things about the shipped server (its CLI, its signal handling, its
crash behaviour), so it starts the server exactly as an operator would, in its own
process, instead of an app object inside the test process.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests

from bench.client import billed_usage, sse_events

__all__ = ["ADMIN_KEY", "Admin", "KvgateServer", "Outcome", "Tenant", "billed_usage", "request_body",
           "send", "sse_events"]

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "kvg_harness_admin_key_0123456789"
_BANNER = re.compile(r"serving model '[^']*' on http://127\.0\.0\.1:(\d+)")


class KvgateServer:
    """One ``kvgate serve`` process; ``port 0`` lets the server pick, the banner tells us."""

    def __init__(self, workdir: Path, db_path: Path | None = None, **flags: Any) -> None:
        self.workdir = workdir
        self.db_path = db_path or workdir / "ledger.db"
        self.flags = {"host_cache_bytes": 4 * 1024 * 1024, **flags}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> KvgateServer:
        self.starts += 1
        log_path = self.workdir / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0",
               "--db", f"sqlite:///{self.db_path}"]
        for name, value in self.flags.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        env = {**os.environ, "KVGATE_ADMIN_KEY": ADMIN_KEY, "KVGATE_LOG_LEVEL": "warning",
               "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvgate serve exited with {self.proc.returncode}:\n"
                                   + log_path.read_text(errors="replace")[-4000:])
            if not self.port:
                m = _BANNER.search(log_path.read_text(errors="replace"))
                if m:
                    self.port = int(m.group(1))
            if self.port and self._ready():
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("kvgate serve was not ready in time:\n"
                           + log_path.read_text(errors="replace")[-4000:])

    def __enter__(self) -> KvgateServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ready(self) -> bool:
        try:
            return requests.get(self.url + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup; what the ledger holds is what a crash leaves."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.port = 0

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.port = 0

    def ledger_rows(self, tenant_id: int | None = None) -> dict[str, dict[str, Any]]:
        """Usage rows read straight from the SQLite file: request_id → row (with a count)."""
        con = sqlite3.connect(self.db_path)
        con.row_factory = sqlite3.Row
        try:
            sql = ("SELECT request_id, COUNT(*) AS n, MIN(status) AS status, "
                   "MIN(prompt_tokens) AS prompt_tokens, MIN(cached_tokens) AS cached_tokens, "
                   "MIN(cache_write_5m_tokens + cache_write_1h_tokens) AS cache_write_tokens, "
                   "MIN(completion_tokens) AS completion_tokens, MIN(cost_micros) AS cost_micros "
                   "FROM usage_events")
            args: tuple[Any, ...] = ()
            if tenant_id is not None:
                sql += " WHERE tenant_id = ?"
                args = (tenant_id,)
            rows = con.execute(sql + " GROUP BY request_id", args).fetchall()
        finally:
            con.close()
        return {r["request_id"]: dict(r) for r in rows}


@dataclass
class Tenant:
    id: int
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class Admin:
    def __init__(self, server: KvgateServer) -> None:
        self.server = server
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(method, self.server.url + path, headers=self.headers,
                             timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def tenant(self, prefix: str = "t", **fields: Any) -> Tenant:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        t = self._call("POST", "/admin/tenants", json={"name": name, **fields})
        k = self._call("POST", f"/admin/tenants/{t['id']}/keys")
        return Tenant(int(t["id"]), name, k["key"])

    def usage(self, tenant_id: int) -> dict[str, Any]:
        return self._call("GET", "/admin/usage", params={"tenant_id": tenant_id})

    def cache_stats(self) -> dict[str, Any]:
        return self._call("GET", "/admin/cache/stats")


@dataclass
class Outcome:
    """What a client saw: status, whether the body arrived in full, and the usage in it."""

    kind: str
    status: int
    request_id: str | None = None
    complete: bool = False
    usage: dict[str, int] | None = None
    retry_after: str | None = None
    text: str = ""


def request_body(kind: str, text: str, max_tokens: int, **extra: Any) -> tuple[str, dict]:
    """kind: chat | completions | messages, with ``-stream`` for the SSE variant."""
    base, _, mode = kind.partition("-")
    stream = mode == "stream"
    if base == "chat":
        body: dict[str, Any] = {"model": "demo", "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": text}]}
        path = "/v1/chat/completions"
    elif base == "completions":
        body = {"model": "demo", "max_tokens": max_tokens, "prompt": text}
        path = "/v1/completions"
    else:
        body = {"model": "demo", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": text}]}
        path = "/v1/messages"
    if stream:
        body["stream"] = True
        if base != "messages":
            body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return path, body


async def send(session: aiohttp.ClientSession, url: str, tenant: Tenant, kind: str,
               text: str, max_tokens: int, **extra: Any) -> Outcome:
    """One request, read to the end; ``complete`` only when the final marker arrived."""
    path, body = request_body(kind, text, max_tokens, **extra)
    async with session.post(url + path, json=body, headers=tenant.headers) as resp:
        out = Outcome(kind, resp.status, resp.headers.get("x-request-id"),
                      retry_after=resp.headers.get("Retry-After"))
        if resp.status != 200:
            out.text = await resp.text()
            return out
        if not body.get("stream"):
            data = await resp.json()
            out.usage = billed_usage(kind, data["usage"])
            out.complete = True
            return out
        try:
            async for event in sse_events(resp):
                if event == "[DONE]" or (isinstance(event, dict)
                                         and event.get("type") == "message_stop"):
                    out.complete = True
                elif isinstance(event, dict) and event.get("usage") and (
                        event.get("type") in (None, "message_delta")):
                    out.usage = billed_usage(kind, event["usage"])  # not message_start's
        except aiohttp.ClientError:
            pass  # the connection died; ``complete`` says whether the end marker came first
        return out
