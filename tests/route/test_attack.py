"""The router under a hostile tenant and an unlucky operator: bodies it cannot render, too
big or too slow, clients that hang up, replicas that answer garbage or stall, malformed
cache events, revoked keys, the admin key on tenant routes, forged request ids and
hop-by-hop headers."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests

from kvgate.gateway.edge.context import EDGE
from kvgate.gateway.protocol.wire import STREAM
from testkit import slow_client
from testkit.admin import ADMIN_KEY
from testkit.router import RouterThread
from tests.route.conftest import Fleet

CHAT = "/v1/chat/completions"


def _router_to(fleet: Fleet, urls: list[str], **settings: Any) -> RouterThread:
    return RouterThread(db=fleet.replicas[0].settings.ledger.db, admin_key=ADMIN_KEY, replicas=urls,
                        events_url=fleet.events_url, **settings).start()


def _wait_healthy(router: RouterThread, n: int) -> None:
    deadline = time.monotonic() + 20
    while len(router.router.pool.healthy()) < n:
        assert time.monotonic() < deadline, "the router never saw its replicas"
        time.sleep(0.05)


def _error(r: requests.Response) -> tuple[int, str | None, str | None]:
    err = r.json()["error"]
    return r.status_code, err.get("type"), err.get("code")


# -- bodies --------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"model": "demo"}',
                                  b'{"model": "demo", "messages": "nope"}',
                                  b'{"model": "demo", "messages": [{"role": "wizard"}]}',
                                  b'{"model": "demo", "messages": [], "tools": 5}'])
def test_a_body_the_router_cannot_render_gets_the_replicas_own_error(
        fleet: Fleet, body: bytes) -> None:
    headers = {**fleet.tenant.headers, "Content-Type": "application/json"}
    direct = requests.post(fleet.replicas[0].url + CHAT, data=body, headers=headers,
                           timeout=30)
    routed = requests.post(fleet.router.url + CHAT, data=body, headers=headers, timeout=30)
    assert 400 <= direct.status_code < 500
    assert _error(routed) == _error(direct)
    assert routed.json()["error"]["message"] == direct.json()["error"]["message"]


def test_a_refused_request_moves_neither_the_queue_cost_nor_the_share(fleet: Fleet) -> None:
    """A prompt no replica runs (too long: refused untokenized, billed nothing) costs the
    router no tokenizing and changes nothing routing weighs: counted, one such request
    raised the price of imbalance a thousandfold and pushed every tenant's conversations
    off their cached prefixes. An answered request counts as before."""
    router = fleet.router.router
    q0 = router.queue_cost.value
    shares = {r.url: router.recent.of(r.url) for r in router.pool.healthy()}
    opened = {u: router.recent.opened(u) for u in shares}  # each of them would open one
    for body in ({"messages": [{"role": "user", "content": "a" * 3_000_000}]},
                 {"messages": [{"role": "user", "content": "b" * 6000}], "max_tokens": -1},
                 {"messages": [{"role": "user", "content": "c" * 6000}],
                  "prompt_cache_key": 7}):
        r = requests.post(fleet.router.url + CHAT, headers=fleet.tenant.headers, timeout=60,
                          json={"model": "demo", **body})
        assert r.status_code == 400, r.text

    def hashes(n: int) -> list[bytes]:
        return router.renderer.hashes(CHAT, json.dumps(
            {"messages": [{"role": "user", "content": "a" * n}]}).encode(),
            fleet.tenant.id, "demo", 16)

    assert hashes(9000) == [] and hashes(100_000) == []  # past the context of 8192
    assert len(hashes(8000)) == 500
    assert router.queue_cost.value == q0
    assert all(router.recent.of(u) == pytest.approx(v, abs=1e-9) for u, v in shares.items())
    assert all(router.recent.opened(u) == pytest.approx(v, abs=1e-9) for u, v in opened.items())
    assert fleet.chat("d" * 600).status_code == 200
    assert router.queue_cost.value != q0
    assert sum(router.recent.of(u) for u in shares) > sum(shares.values())


def test_a_big_body_is_read_off_the_event_loop(fleet: Fleet,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing a 4 MB body for its cache key took up to a second on the router's event
    loop, stalling every other client's request meanwhile; it was parsed twice (prompt,
    cache key)."""
    from kvgate.gateway.route import app as route_app
    from kvgate.gateway.route.prompt import parse_body

    threads: list[str] = []

    def spy(raw: bytes) -> dict[str, Any] | None:
        threads.append(threading.current_thread().name)
        return parse_body(raw)

    monkeypatch.setattr(route_app, "parse_body", spy)
    big = {"model": "demo", "max_tokens": 1, "prompt_cache_key": "k",
           "messages": [{"role": "user", "content": "hi"}], "x": [[1, 2]] * 200_000}
    requests.post(fleet.router.url + CHAT, headers=fleet.tenant.headers, timeout=60,
                  json=big)
    assert fleet.chat("small").status_code == 200
    assert len(threads) == 2
    assert threads[0].startswith("kvgate-prepare")  # the bounded pool's
    assert threads[1] == "kvgate-test-router"  # a small body: on the loop, no hop


def test_a_body_over_the_limit_is_refused_at_the_router_in_the_api_shape(
        fleet: Fleet) -> None:
    limit = fleet.router.settings.http.max_body_bytes
    big = b'{"model": "demo", "messages": [], "x": "' + b"a" * (limit + 10) + b'"}'
    r = requests.post(fleet.router.url + CHAT, data=big, headers=fleet.tenant.headers,
                      timeout=60)
    assert _error(r)[0] == 413
    # chunked, with no Content-Length to refuse it up front: cut at the limit all the same
    r = requests.post(fleet.router.url + CHAT, data=iter([big[i:i + 65536]
                                                          for i in range(0, len(big), 65536)]),
                      headers=fleet.tenant.headers, timeout=60)
    assert _error(r)[0] == 413
    assert fleet.chat("still serving").status_code == 200


def _raw(port: int, data: bytes, timeout_s: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    return out


def test_a_body_that_never_finishes_arriving_is_cut_with_408(fleet: Fleet) -> None:
    router = _router_to(fleet, [r.url for r in fleet.replicas], read_timeout_s=1)
    try:
        _wait_healthy(router, len(fleet.replicas))
        head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                f"{fleet.tenant.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 500\r\n\r\n").encode()
        answer = _raw(router.port, head + b'{"model": "demo", ')
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"request_timeout"' in answer
    finally:
        router.stop()


# -- clients that hang up ------------------------------------------------------------------

def _billed(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return fleet.replicas[0].ledger_rows(fleet.tenant.id)


def _idle(fleet: Fleet) -> bool:
    return all(r.state.engine.num_running() == 0 and r.state.engine.queue_depth() == 0
               for r in fleet.replicas)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_stops_the_replica_and_is_billed_once(
        fleet: Fleet, stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    started = threading.Event()
    for replica in fleet.replicas:  # slow steps, no end-of-sequence: only the client stops it
        engine = replica.state.engine
        real = engine.runner.run

        def run(chunks: list[Any], real: Any = real) -> Any:
            if any(c.seq.num_output >= 2 for c in chunks):
                started.set()
            time.sleep(0.01)
            return real(chunks)

        monkeypatch.setattr(engine.runner, "run", run)
        monkeypatch.setattr(engine.tokenizer, "eos_token_ids", [])
    budget = 1500
    rid = f"hangup-{int(stream)}"  # (the ledger keeps the replica's own id)
    body = json.dumps({"model": "demo", "max_tokens": budget, "temperature": 0,
                       "stream": stream,
                       "messages": [{"role": "user", "content": "a long answer please"}]})
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {fleet.tenant.key}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"x-request-id: {rid}\r\n\r\n").encode()
    before = set(_billed(fleet))
    with socket.create_connection(("127.0.0.1", fleet.router.port), timeout=30) as s:
        s.sendall(head + body.encode())
        if stream:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")  # the answer started
        assert started.wait(60), "the replica never started the request"
    fleet.wait(lambda: set(_billed(fleet)) - before, "the request's bill", timeout_s=60)
    time.sleep(0.5)  # a second bill, were there one, would be written by now
    rows = [r for i, r in _billed(fleet).items() if i not in before]
    assert len(rows) == 1
    (row,) = rows
    assert row["n"] == 1
    assert row["status"] == "cancelled", row
    assert row["completion_tokens"] < budget
    fleet.wait(lambda: _idle(fleet), "the replicas to stop generating")


def test_a_replica_cut_for_its_silence_stops_and_bills_once(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole answer that takes longer than --upstream-idle-timeout-s: the client gets the
    router's 504, the connection to the replica closes, and the replica stops and bills
    what it produced once, as cancelled; the router goes on serving from the same pool."""
    for replica in fleet.replicas:  # slow steps, no end-of-sequence: only the cut stops it
        engine = replica.state.engine
        real = engine.runner.run

        def run(chunks: list[Any], real: Any = real) -> Any:
            time.sleep(0.01)
            return real(chunks)

        monkeypatch.setattr(engine.runner, "run", run)
        monkeypatch.setattr(engine.tokenizer, "eos_token_ids", [])
    router = _router_to(fleet, [r.url for r in fleet.replicas], upstream_idle_timeout_s=1.0)
    before = set(_billed(fleet))
    try:
        _wait_healthy(router, len(fleet.replicas))
        r = requests.post(router.url + CHAT, headers=fleet.tenant.headers, timeout=60,
                          json={"model": "demo", "max_tokens": 1500, "temperature": 0,
                                "messages": [{"role": "user", "content": "take your time"}]})
        assert _error(r) == (504, "server_error", "upstream_timeout")
        fleet.wait(lambda: bool(set(_billed(fleet)) - before), "the request's bill")
        fleet.wait(lambda: _idle(fleet), "the replicas to stop generating")
        time.sleep(0.5)  # a second bill, were there one, would be written by now
        (row,) = [r for i, r in _billed(fleet).items() if i not in before]
        assert row["n"] == 1 and row["status"] == "cancelled", row
        assert row["completion_tokens"] < 1500
        assert len(router.router.pool.healthy()) == len(fleet.replicas)
        monkeypatch.undo()
        ok = requests.post(router.url + CHAT, headers=fleet.tenant.headers, timeout=60,
                           json={"model": "demo", "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "and now"}]})
        assert ok.status_code == 200
    finally:
        router.stop()


def test_head_and_other_methods_get_the_replica_s_answer_on_a_kept_connection(
        fleet: Fleet) -> None:
    """HEAD and the methods an API path does not take get the replica's own answer through
    the router (its error in the API's shape, no body to a HEAD), and the connection they
    came on serves the next request."""
    with requests.Session() as session:
        session.headers.update(fleet.tenant.headers)
        for method, path in (("HEAD", "/v1/models"), ("HEAD", CHAT), ("GET", CHAT),
                             ("DELETE", CHAT), ("OPTIONS", "/v1/messages")):
            routed = session.request(method, fleet.router.url + path, timeout=30)
            direct = requests.request(method, fleet.replicas[0].url + path, timeout=30,
                                      headers=fleet.tenant.headers)
            assert routed.status_code == direct.status_code, (method, path)
            assert routed.content == direct.content, (method, path)
            models = session.get(fleet.router.url + "/v1/models", timeout=30)
            assert models.json()["data"][0]["id"] == "demo"


def test_a_client_that_stops_reading_is_cut_by_the_router_and_billed_once(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's own write timeout: the answer is cut, the replica connection closed, so
    the replica stops and bills what it produced once, as cancelled."""
    slow_client.small_send_buffers(monkeypatch)
    router = _router_to(fleet, [r.url for r in fleet.replicas], write_timeout=1.0)
    before = set(_billed(fleet))
    sock = None
    try:
        _wait_healthy(router, len(fleet.replicas))
        sock = slow_client.stalled_request(router.port, CHAT,
                                           slow_client.big_stream_body("demo", 1000),
                                           fleet.tenant.headers)
        fleet.wait(lambda: bool(set(_billed(fleet)) - before), "the request's bill",
                   timeout_s=120)
        fleet.wait(lambda: _idle(fleet), "the replicas to stop generating", timeout_s=60)
        counted = router.app[EDGE].metrics.registry.get_sample_value(  # type: ignore[index]
            "kvgate_requests_total", {"endpoint": CHAT, "status": "408",
                                      "tenant": str(fleet.tenant.id)})
    finally:
        if sock is not None:
            sock.close()
        router.stop()
    (row,) = [r for i, r in _billed(fleet).items() if i not in before]
    assert row["n"] == 1 and row["status"] == "cancelled", row
    assert row["completion_tokens"] < 1000
    assert counted == 1
    assert fleet.chat("still serving").status_code == 200


# -- replicas that misbehave ---------------------------------------------------------------

class BadReplica:
    """A replica that answers ``/admin/load`` well and everything else as ``mode`` says:
    ``garbage`` (bytes that are not HTTP), ``stall-sse`` (a stream's headers and one event,
    then nothing), ``stall-body`` (headers announcing a body that never comes), ``echo``
    (the request's headers as JSON, with hop-by-hop headers of its own), ``silent`` (no
    answer at all), ``refuse-stalled`` (a 503 whose body never comes), ``shapes`` (a whole
    answer shaped as the path's last part says, ``_shape``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0  # (counted where a test needs it)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            server = self.loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = [tuple(x.strip() for x in line.split(":", 1))
                           for line in lines[1:] if ":" in line]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                if length:
                    await reader.readexactly(length)
                if lines[0].startswith("GET /admin/load"):
                    body = json.dumps({"replica_id": f"bad-{self.port}", "epoch": "1",
                                       "model_id": "demo", "block_size": 16,
                                       "queue_depth": 0, "running": 0, "free_pages": 10,
                                       "device_pages": 10}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                elif self.mode == "garbage":
                    writer.write(b"\x00\x01 not http at all \xff\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                elif self.mode == "stall-sse":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    event = b'data: {"choices": []}\n\n'
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    await asyncio.sleep(3600)
                elif self.mode == "silent":  # took the request, never answers
                    await asyncio.sleep(3600)
                elif self.mode == "refuse-stalled":  # a 503's headers, then its body stalls
                    self.requests += 1
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: 100\r\n\r\n{")
                    await writer.drain()
                    await asyncio.sleep(3600)
                elif self.mode == "shapes":  # a whole answer shaped by the path's last part
                    if await self._shape(lines[0].split()[1].rsplit("/", 1)[-1], writer):
                        return
                elif self.mode == "stall-body":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000\r\n\r\n{\"id\": ")
                    await writer.drain()
                    await asyncio.sleep(3600)
                else:  # echo
                    body = json.dumps([[k, v] for k, v in headers]).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Connection: keep-alive, X-Upstream-Hop\r\n"
                                 b"X-Upstream-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
                                 b"X-Kept: yes\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _shape(self, shape: str, writer: asyncio.StreamWriter) -> bool:
        """Write the answer ``shape`` names; True once the connection is to close."""
        json_head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if shape == "empty":
            writer.write(json_head + b"Content-Length: 0\r\n\r\n")
        elif shape == "no-content":
            writer.write(b"HTTP/1.1 204 No Content\r\nX-Kept: yes\r\n\r\n")
        elif shape == "chunked":  # a JSON body in several chunks, not an event stream
            writer.write(json_head + b"Transfer-Encoding: chunked\r\n\r\n")
            for part in (b'{"a": ', b'1, "b": ', b"2}"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
        elif shape == "close-after-headers":  # headers announce a body; then it is gone
            writer.write(json_head + b"Content-Length: 100\r\n\r\n")
            await writer.drain()
            return True
        elif shape == "chunked-close":
            writer.write(json_head + b"Transfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            return True
        elif shape == "silent-after-headers":
            writer.write(json_head + b"Content-Length: 100\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(3600)
        else:
            writer.write(json_head + b"Content-Length: 2\r\n\r\n{}")
        return False

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def bad_replica(request: pytest.FixtureRequest, fleet: Fleet) -> Iterator[RouterThread]:
    bad = BadReplica(request.param)
    router = _router_to(fleet, [bad.url], upstream_idle_timeout_s=1.0)
    try:
        _wait_healthy(router, 1)
        yield router
    finally:
        router.stop()
        bad.close()


@pytest.mark.parametrize("bad_replica, status, code", [
    ("garbage", 502, "upstream_failed"),  # answers what is not HTTP
    ("silent", 504, "upstream_timeout"),  # took the request, never answers: not held forever
], indirect=["bad_replica"])
def test_a_replica_that_answers_garbage_or_nothing_is_an_error_in_the_api_shape(
        fleet: Fleet, bad_replica: RouterThread, status: int, code: str) -> None:
    r = requests.post(bad_replica.url + CHAT, headers=fleet.tenant.headers, timeout=30,
                      json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    assert _error(r)[0] == status
    assert r.json()["error"]["code"] == code
    assert r.headers.get("x-request-id")


@pytest.mark.parametrize("bad_replica", ["stall-sse"], indirect=True)
def test_a_stream_whose_replica_stalls_ends_with_an_error_event(
        fleet: Fleet, bad_replica: RouterThread) -> None:
    r = requests.post(bad_replica.url + CHAT, headers=fleet.tenant.headers, timeout=30,
                      stream=True, json={"model": "demo", "stream": True,
                                         "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    text = b"".join(r.iter_content(None)).decode()
    assert '"upstream_failed"' in text
    assert "[DONE]" not in text


@pytest.mark.parametrize("bad_replica", ["stall-body"], indirect=True)
def test_a_plain_answer_whose_replica_stalls_is_cut_not_held_forever(
        fleet: Fleet, bad_replica: RouterThread) -> None:
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(bad_replica.url + CHAT, headers=fleet.tenant.headers, timeout=30,
                      json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize("bad_replica", ["shapes"], indirect=True)
def test_whole_answers_of_any_shape_and_replicas_that_fail_before_their_first_byte(
        fleet: Fleet, bad_replica: RouterThread) -> None:
    """A whole answer's headers leave with its first body bytes. An empty body, a 204 and a
    chunked JSON body pass through as the replica sent them. A replica that sent its
    headers and then went away or fell silent before any body byte had sent the client
    nothing: it gets the router's 502 or 504 in the API's shape (it got an empty reply, no
    status line at all)."""
    def post(shape: str) -> requests.Response:
        return requests.post(bad_replica.url + "/v1/shapes/" + shape, json={}, timeout=30,
                             headers=fleet.tenant.headers)

    r = post("empty")
    assert (r.status_code, r.content, r.headers["Content-Length"]) == (200, b"", "0")
    r = post("no-content")
    assert (r.status_code, r.content, r.headers["X-Kept"]) == (204, b"", "yes")
    r = post("chunked")
    assert r.status_code == 200 and r.json() == {"a": 1, "b": 2}
    for shape in ("close-after-headers", "chunked-close"):
        r = post(shape)
        assert _error(r) == (502, "server_error", "upstream_failed"), shape
        assert r.headers.get("x-request-id")
    r = post("silent-after-headers")
    assert _error(r) == (504, "server_error", "upstream_timeout")
    assert post("ok").json() == {}  # and the router goes on


@pytest.mark.parametrize("bad_replica", ["garbage"], indirect=True)
def test_neither_the_admin_key_nor_a_tenant_s_reaches_the_router_s_log(
        fleet: Fleet, bad_replica: RouterThread, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp's response errors carry the request's headers in their repr, which the
    router logged: a snapshot that failed wrote the admin key to the log, a replica that
    answered garbage the key of the tenant whose request it was."""
    def records() -> list[logging.LogRecord]:
        return caplog.get_records("setup") + caplog.records

    fleet.wait(lambda: any("snapshot failed" in r.getMessage() for r in records()),
               "a snapshot of the garbage replica to fail")
    r = requests.post(bad_replica.url + CHAT, headers=fleet.tenant.headers, timeout=30,
                      json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    assert _error(r)[0] == 502
    fleet.wait(lambda: any("left the pool" in r.getMessage() for r in records()),
               "the garbage replica to leave the pool")
    text = "\n".join(r.getMessage() for r in records())
    assert ADMIN_KEY not in text
    assert fleet.tenant.key not in text


def test_a_503_whose_body_never_comes_is_a_refusal_not_a_request_held_forever(
        fleet: Fleet) -> None:
    """A replica that answers 503 before any work is a refusal and the next replica is
    tried; one whose 503 body then stalled held the request forever (its body was read
    with no timeout)."""
    bad = BadReplica("refuse-stalled")
    router = _router_to(fleet, [bad.url, fleet.replicas[0].url], upstream_idle_timeout_s=1.0)
    try:
        _wait_healthy(router, 2)
        for i in range(6):
            r = requests.post(router.url + CHAT, headers=fleet.tenant.headers, timeout=60,
                              json={"model": "demo", "max_tokens": 1,
                                    "messages": [{"role": "user", "content": f"try {i}"}]})
            assert r.status_code == 200, r.text
    finally:
        router.stop()
        bad.close()
    assert bad.requests >= 1  # it was tried first, at least once


@pytest.mark.parametrize("bad_replica", ["echo"], indirect=True)
def test_hop_by_hop_headers_stop_at_the_router(fleet: Fleet,
                                               bad_replica: RouterThread) -> None:
    r = requests.post(bad_replica.url + CHAT, timeout=30,
                      headers={**fleet.tenant.headers, "Connection": "keep-alive, X-Hop-Me",
                               "X-Hop-Me": "secret", "Keep-Alive": "timeout=99",
                               "Proxy-Authorization": "Basic eA==", "TE": "trailers",
                               "X-Forwarded-For": "10.9.9.9", "X-Kept": "yes",
                               "Expect": "100-continue"},
                      json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    seen: dict[str, list[str]] = {}
    for k, v in r.json():
        seen.setdefault(k.lower(), []).append(v)
    for hop in ("x-hop-me", "keep-alive", "proxy-authorization", "te", "transfer-encoding",
                "expect"):
        assert hop not in seen, hop
    upstream = bad_replica.router.pool.healthy()[0].url
    assert seen["host"] == [upstream.removeprefix("http://")]
    assert seen["content-length"] == [str(len(r.request.body or b""))]
    assert seen["x-kept"] == ["yes"]
    assert seen["x-forwarded-for"] == ["10.9.9.9, 127.0.0.1"]
    assert "X-Upstream-Hop" not in r.headers and "Keep-Alive" not in r.headers
    assert r.headers["X-Kept"] == "yes"


# -- events, keys and ids --------------------------------------------------------------------

def test_malformed_cache_events_are_skipped_and_the_router_goes_on(fleet: Fleet) -> None:
    client = redis.Redis.from_url(fleet.events_url)
    replica_id = fleet.replicas[0].settings.events.replica_id
    view = fleet.router.router.index.views[replica_id]
    good = {"replica": replica_id, "epoch": view.epoch, "first": str(view.seq + 1)}
    for fields in [
        {"junk": "1"},
        {**good, "last": "x", "events": "[]"},
        {**good, "last": "1", "events": "[" * 100_000},  # nested past the stack
        {**good, "last": "1", "events": '{"a": 1}'},
        {**good, "last": "1", "events": "5"},
        {**good, "last": "1", "events": '[["s", "ns", "zz", "d"]]'},
        {**good, "last": "1", "events": '[["q", "ns", "00", "d"]]'},
        {**good, "last": "1", "events": '[[1, 2]]'},
        {**good, "last": "1", "events": "null"},
        {"replica": b"\xff\xfe", "epoch": "e", "first": "1", "last": "1", "events": "[]"},
    ]:
        client.xadd(STREAM, fields)  # type: ignore[arg-type]
    client.close()
    task = next(t for t in fleet.router.on_loop(_tasks()) if t == "kvgate-events")
    assert task
    # the follower is still reading: a new prompt's blocks reach the view
    content = "after the junk events " * 8
    assert fleet.chat(content).status_code == 200
    fleet.wait(lambda: any(len(v.blocks) for v in fleet.router.router.index.views.values()
                           if v.synced), "events after the junk")
    hashes = fleet.router.router.renderer.hashes(
        CHAT, json.dumps({"messages": [{"role": "user", "content": content}]}).encode(),
        fleet.tenant.id, fleet.replicas[0].state.engine.store.model_id, 16)
    fleet.wait(lambda: any(fleet.router.router.index.cached_blocks(
        r.settings.events.replica_id, hashes) == len(hashes) for r in fleet.replicas),
        "the new prompt's blocks in the router's view")
    assert fleet.chat("and more").status_code == 200


def test_a_stream_replaced_after_a_forged_last_id_is_followed_again(fleet: Fleet) -> None:
    """An entry forged with the largest id a stream can hold moves every router's read
    position there; once the stream is deleted (an operator cleaning up), every new entry
    sorts before it, and a running router never read the stream again (each view then
    rebuilt from a snapshot every few seconds, for good). It follows the stream anew."""
    client = redis.Redis.from_url(fleet.events_url)
    follower = fleet.router.router.follower
    try:
        client.xadd(STREAM, {"junk": "1"}, id="18446744073709551615-18446744073709551615")
        fleet.wait(lambda: follower.last_id.startswith("18446744073709551615-"),
                   "the router to read past the forged entry")
        client.delete(STREAM)
        assert fleet.chat("once the stream is replaced " * 8).status_code == 200

        def following() -> bool:
            top = client.xrevrange(STREAM, count=1)
            return bool(top) and follower.last_id == top[0][0].decode()

        fleet.wait(following, "the router to read the new stream")
    finally:
        client.close()


async def _tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if not t.done()]


def test_a_revoked_key_stops_working_at_the_router_as_at_a_replica(fleet: Fleet) -> None:
    tenant = fleet.replicas[0].admin.tenant("revoke")
    ok = requests.post(fleet.router.url + CHAT, headers=tenant.headers, timeout=30,
                       json={"model": "demo", "max_tokens": 1,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200  # the router's key cache now holds it
    fleet.replicas[0].admin.revoke(tenant.key_id)

    def refused() -> bool:
        r = requests.post(fleet.router.url + CHAT, headers=tenant.headers, timeout=30,
                          json={"model": "demo", "max_tokens": 1,
                                "messages": [{"role": "user", "content": "hi"}]})
        return r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    fleet.wait(refused, "the revocation to reach the router (its key cache's TTL)")


def test_the_admin_key_on_tenant_routes_gets_the_replicas_refusal(fleet: Fleet) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    direct = requests.post(fleet.replicas[0].url + CHAT, headers=admin, json=body, timeout=30)
    routed = requests.post(fleet.router.url + CHAT, headers=admin, json=body, timeout=30)
    assert _error(routed) == _error(direct)
    assert routed.status_code == 403
    # and the router's own /admin routes are not the replicas': nothing is proxied there
    r = requests.get(fleet.router.url + "/admin/tenants", headers=admin, timeout=30)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "admin_on_replicas"
    assert "replica" in r.json()["error"]["message"]
    # without the admin key the router says no more than a replica would
    r = requests.get(fleet.router.url + "/admin/tenants", headers=fleet.tenant.headers,
                     timeout=30)
    assert r.status_code == 403


@pytest.mark.parametrize("forged", ["a" * 5000, "id with spaces", "<script>", "x\tb",
                                    "ünïcode"])
def test_a_forged_request_id_is_replaced_by_the_ledger_s(
        fleet: Fleet, forged: str) -> None:
    """An id the router will not pass on is dropped: the answer carries the replica's own
    id, the one its ledger row has, as a single server's answer does."""
    before = set(_billed(fleet))
    r = requests.post(fleet.router.url + CHAT, timeout=30,
                      headers={**fleet.tenant.headers,
                               "x-request-id": forged.encode().decode("latin-1")},
                      json={"model": "demo", "max_tokens": 1,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert rid != forged and re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", rid)
    rows = {i: r for i, r in _billed(fleet).items() if i not in before}
    assert list(rows) == [rid] and rows[rid]["n"] == 1
    assert r.json()["id"].endswith(rid.removeprefix("req_"))
