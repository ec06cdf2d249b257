"""The connection layer, over raw sockets: idle and slow connections are closed after the
read timeout (a slowloris trickling headers included), a stalled body gets a 408, and what
aiohttp's HTTP parser refuses comes back in the API's JSON error shape."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from kvgate.gateway import loop
from kvgate.gateway.edge.transport import GatewayRunner
from testkit import MiB, Tenant, ThreadServer

SAFETY_S = 30.0  # a bound on waiting, never an assertion about time


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """A server whose read timeout is one second."""
    with ThreadServer(Path(tmp_path_factory.mktemp("transport")), device="cpu",
                      device_cache_bytes=16 * MiB, host_cache_bytes=16 * MiB,
                      read_timeout_s=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def quick_tenant(quick: ThreadServer) -> Tenant:
    return quick.admin.tenant()


def _connect(srv: ThreadServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=SAFETY_S)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (EOF)."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _json_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower(), head
    return status, json.loads(body)


def test_idle_connection_is_closed(quick: ThreadServer) -> None:
    with _connect(quick) as s:
        assert _closed(s)


def test_slowloris_with_partial_headers_is_closed(quick: ThreadServer) -> None:
    """A header line every 0.3 s, never the blank line that ends them: the server hangs up
    although bytes keep arriving."""
    with _connect(quick) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + SAFETY_S
        closed = False
        i = 0
        while time.monotonic() < deadline:
            try:
                s.sendall(f"X-Slow-{i}: a\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            s.settimeout(0.3)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
            i += 1
        assert closed, "the server kept a connection whose headers never ended"


def test_idle_keep_alive_connection_is_closed_after_a_request(quick: ThreadServer) -> None:
    with _connect(quick) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = _read_until_closed(s)
        assert data.startswith(b"HTTP/1.1 200"), data[:100]


def test_stalled_body_gets_a_408_and_the_connection_closes(quick: ThreadServer,
                                                           quick_tenant: Tenant) -> None:
    with _connect(quick) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + quick_tenant.key.encode() + b"\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        status, body = _json_error(_read_until_closed(s))
    assert status == 408
    assert body["error"]["code"] == "request_timeout"


def test_a_body_still_trickling_after_its_408_is_not_read_on(
        quick: ThreadServer, quick_tenant: Tenant) -> None:
    """A 408 (the body stalled) ends the connection: the server does not go on reading
    (and discarding) the rest of the body for aiohttp's lingering time (10 s) while its
    client trickles it, a byte every 0.1 s, for 5 s more. (A 413 keeps aiohttp's lingering
    read: a client sending a big body at full speed must be able to finish and read its
    413, where a close would reset the connection under it.)"""
    length, status = 100_000, 408
    with _connect(quick) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + quick_tenant.key.encode() + b"\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: " + str(length).encode() + b"\r\n\r\n{")
        s.settimeout(SAFETY_S)
        head = s.recv(65536)
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head[:100]
        s.settimeout(0.1)
        closed = False
        for _ in range(50):
            try:
                s.sendall(b" ")
                closed = s.recv(65536) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            if closed:
                break
        assert closed, f"the server kept reading a body it had answered {status}"


MALFORMED = [
    ("header-line-too-long", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000
     + b"\r\n\r\n"),
    ("too-many-headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
     + b"".join(f"X-H{i}: v\r\n".encode() for i in range(200)) + b"\r\n"),
    ("content-length-and-chunked", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two-content-lengths", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
    ("bad-request-line", b"GARBAGE\r\n\r\n"),
    ("bad-header-name", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_http_gets_a_json_error(quick: ThreadServer, raw: bytes) -> None:
    with _connect(quick) as s:
        s.sendall(raw)
        status, body = _json_error(_read_until_closed(s))
    assert 400 <= status < 500
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "bad_http_request"


def test_bad_chunk_framing_in_the_body_is_a_400(quick: ThreadServer,
                                                quick_tenant: Tenant) -> None:
    with _connect(quick) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + quick_tenant.key.encode() + b"\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        status, body = _json_error(_read_until_closed(s))
    assert 400 <= status < 500
    assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path, header", [
    ("/v1/models", b"Authorization: Bearer \xff\xfe"),
    ("/v1/messages", b"x-api-key: k\xe9y"),
    ("/metrics", b"Authorization: Bearer \xff"),
])
def test_a_key_that_is_not_utf8_is_refused_not_a_crash(quick: ThreadServer, path: str,
                                                        header: bytes) -> None:
    """Header bytes that are not UTF-8 reach the handler as surrogates; no key we issue
    has them: 401 in the API's shape, never a 500 (which anyone could cause unkeyed)."""
    s = _connect(quick)
    method = b"POST" if path == "/v1/messages" else b"GET"
    s.sendall(method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              + header + b"\r\nContent-Length: 2\r\n\r\n{}")
    status, body = _json_error(_read_until_closed(s))
    s.close()
    assert status == 401, body
    assert "error" in body


async def _drain_a_stuck_stream() -> BaseException | None:
    """Stop a runner while its one request is stuck mid-stream; what its request body
    reported when the handler was cancelled (None: nothing, the body was left alone)."""
    cancelled: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def stuck(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await asyncio.Event().wait()  # a write its client never takes
        except asyncio.CancelledError:
            cancelled.set_result(request.content.exception())
            raise
        return resp

    app = web.Application()
    app.router.add_post("/stuck", stuck)
    runner = GatewayRunner(app, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(b"POST /stuck HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await reader.readuntil(b"\r\n\r\n")  # the stream's headers: the handler is stuck
    await asyncio.wait_for(runner.cleanup(), SAFETY_S)
    writer.close()
    assert cancelled.done(), "the stuck handler was never cancelled"
    return cancelled.result()


@pytest.mark.parametrize("name", loop.LOOPS)
def test_a_stream_stuck_at_shutdown_is_cancelled_when_the_drain_window_ends(name: str) -> None:
    """SIGTERM drains for ``--shutdown-timeout-s`` once: a handler still running then (a
    stream whose client stopped reading) is cancelled. aiohttp's own shutdown instead
    failed the request's body (which a streaming handler is not reading) and waited the
    whole timeout again before cancelling it, so the drain lasted twice as long."""
    assert loop.run(_drain_a_stuck_stream(), name) is None
