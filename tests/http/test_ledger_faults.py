"""The gateway when its ledger database goes away under it: PostgreSQL killed in the middle
of a stream (the client still gets its answer; the usage is spooled and lands in the
database exactly once, live or after a restart), and a SQLite file deleted under a running
server (503 with Retry-After, readiness fails, the path is logged, nothing is billed into
a file nobody reads)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kvgate.gateway.ledger import Ledger
from testkit import ADMIN_KEY, MiB, ThreadServer, iter_sse, request_body
from tests.ledger.pgserver import OwnPostgres
from tests.ledger.test_spool import readonly_writer, rows

FLAGS = {"device": "cpu", "device_cache_bytes": 16 * MiB, "host_cache_bytes": 16 * MiB,
         "default_max_tokens": 8}
LONG = 256


def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(600):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def spool_gauge(srv: ThreadServer) -> float:
    text = requests.get(srv.url + "/metrics", timeout=30,
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families["kvgate_ledger_spool_events"].samples[0].value


def long_prompt(srv: ThreadServer, headers: dict[str, str]) -> str:
    """A prompt whose greedy answer runs to ``LONG`` tokens (the demo weights are random)."""
    for i in range(8):
        text = f"Tell me a long story, number {i}."
        path, body = request_body("chat", text, LONG, temperature=0)
        r = requests.post(srv.url + path, json=body, headers=headers, timeout=300)
        assert r.status_code == 200, r.text
        if r.json()["choices"][0]["finish_reason"] == "length":
            return text
    raise AssertionError("no prompt ran to max_tokens")


def stream_killing(srv: ThreadServer, pg: OwnPostgres, headers: dict[str, str],
                   text: str) -> tuple[str, str]:
    """Stream; after the first event kill the database; read to the end. Returns the
    request id and the whole text the client got."""
    path, body = request_body("chat-stream", text, LONG, temperature=0)
    with requests.post(srv.url + path, json=body, headers=headers, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200, r.text
        parts, killed, done = [], False, False
        for ev in iter_sse(r):
            if ev.done:
                done = True
                break
            if not killed:
                pg.kill()
                killed = True
                # the engine is still generating: the usage is recorded after the kill
                assert srv.state.engine.num_running() == 1
            for choice in ev.json().get("choices", []):
                parts.append(choice["delta"].get("content") or "")
        assert done, "the stream did not finish"
        return r.headers["x-request-id"], "".join(parts)


def db_rows(url: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        ledger = await Ledger.open(url, migrate=False)
        try:
            return await rows(ledger)
        finally:
            await ledger.close()
    return asyncio.run(read())


def test_postgres_killed_mid_stream_bills_once_live_and_after_restart(tmp_path: Path) -> None:
    pg = OwnPostgres()
    try:
        pg.start()
        asyncio.run(_migrate(pg.url))
        settings = {**FLAGS, "db": pg.url, "spool_dir": str(tmp_path / "spool")}
        with ThreadServer(tmp_path / "one", **settings) as srv:
            tenant = srv.admin.tenant()
            text = long_prompt(srv, tenant.headers)
            fresh = srv.admin.new_key(tenant.id)  # never used: not in the key cache

            first, answer = stream_killing(srv, pg, tenant.headers, text)
            assert len(answer) > 0
            ledger = srv.state.ledger
            assert ledger.spool_depth() == 1 and spool_gauge(srv) == 1
            ready = requests.get(srv.url + "/readyz", timeout=30)
            assert ready.status_code == 200
            assert ready.json()["ledger"] == {"database": "down", "spool_events": 1}
            # a key looked up lately still works; one never seen cannot be checked: 503
            path, body = request_body("chat", "hello", 4)
            r = requests.post(srv.url + path, json=body, timeout=60,
                              headers={"Authorization": f"Bearer {fresh.key}"})
            assert r.status_code == 503 and r.headers["Retry-After"]
            assert r.json()["error"]["code"] == "ledger_unavailable"
            pg.start()
            until(lambda: ledger.spool_depth() == 0, "the spool replayed live")
            assert db_rows(pg.url).get(first) == 1

            second, _ = stream_killing(srv, pg, tenant.headers, text)
            assert ledger.spool_depth() == 1
        # The server stopped with one event spooled; the next one starts while the
        # database is still away (a replica rescheduled during the outage) and serves.
        with ThreadServer(tmp_path / "two", **settings) as srv:
            ready = requests.get(srv.url + "/readyz", timeout=30)
            assert ready.status_code == 200
            assert ready.json()["ledger"] == {"database": "down", "spool_events": 1}
            path, body = request_body("chat", "hello", 4)
            r = requests.post(srv.url + path, json=body, headers=tenant.headers, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_unavailable"
            pg.start()  # the database is back: the spool replays
            until(lambda: srv.state.ledger.spool_depth() == 0, "replayed on start")
            counts = db_rows(pg.url)
            assert (counts.get(first), counts.get(second)) == (1, 1)
            assert srv.admin.usage(tenant.id)["requests"] == len(counts)
    finally:
        pg.close()


async def _migrate(url: str) -> None:
    ledger = await Ledger.open(url)
    await ledger.close()


def test_sqlite_file_deleted_under_a_running_server(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with ThreadServer(tmp_path, **FLAGS) as srv:
        tenant = srv.admin.tenant()
        path, body = request_body("messages", "hello", 4)
        assert requests.post(srv.url + path, json=body, headers=tenant.headers,
                             timeout=60).status_code == 200
        db = Path(srv.settings.ledger.db.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        with caplog.at_level(logging.ERROR, logger="kvgate.ledger"):
            r = requests.post(srv.url + path, json=body, headers=tenant.headers, timeout=60)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["type"] == "error"  # Anthropic's shape on /v1/messages
            ready = requests.get(srv.url + "/readyz", timeout=30)
            assert ready.status_code == 503 and str(db) in ready.json()["error"]["message"]
            for admin_path in ("/admin/tenants", f"/admin/tenants/{tenant.id}", "/admin/usage"):
                r = requests.get(srv.url + admin_path, timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                assert r.status_code == 503 and "Retry-After" in r.headers, (admin_path, r.text)
        assert any(str(db) in rec.getMessage() for rec in caplog.records)
        assert not db.exists()  # nothing recreated it, nothing was billed into it


def test_database_and_spool_both_failing_holds_the_answer_and_refuses_new(
        tmp_path: Path) -> None:
    """The SQLite file refuses writes (fault injected: the writer's connection read-only)
    and the spool directory cannot be made (its parent is a file). The stream running then
    was answered: it ends normally and its usage is held in memory, billed once when the
    database is back. New requests cannot be billed, so they are not served: 503 with
    Retry-After in the API's shape, never a 500."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with ThreadServer(tmp_path, spool_dir=str(blocker / "spool"), **FLAGS) as srv:
        tenant = srv.admin.tenant()
        path, body = request_body("chat", "hello", 4)
        assert requests.post(srv.url + path, json=body, headers=tenant.headers,
                             timeout=60).status_code == 200
        srv.on_loop(readonly_writer(srv.state.ledger, True))
        stream_path, stream_body = request_body("chat-stream", "hello", 4)
        with requests.post(srv.url + stream_path, json=stream_body, headers=tenant.headers,
                           stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            assert any(ev.done for ev in iter_sse(r)), "the stream did not finish"
            held = r.headers["x-request-id"]
        assert len(srv.state.ledger._committer.held) == 1
        r = requests.post(srv.url + path, json=body, headers=tenant.headers, timeout=60)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert r.json()["error"]["code"] == "ledger_unavailable"
        srv.on_loop(readonly_writer(srv.state.ledger, False))  # the disk is back
        for _ in range(300):  # the replayer's next probe notices (a bound, not a timing)
            if requests.get(srv.url + "/readyz", timeout=30).status_code == 200:
                break
            time.sleep(0.1)
        assert requests.post(srv.url + path, json=body, headers=tenant.headers,
                             timeout=60).status_code == 200
        assert srv.on_loop(rows(srv.state.ledger)).get(held) == 1
