"""The connection layer: read timeouts and header limits, and errors aiohttp answers itself.

- ``handler_args(read_timeout_s)`` (given to ``web.Application``): a connection that is idle, or
  still sending its request line and headers, ``read_timeout_s`` after it opened or after
  its last response is closed (aiohttp's keep-alive timer fires whatever arrived of a
  request whose headers never completed, so a slowloris is cut off). Header limits are
  aiohttp's (8190-byte lines and fields, 128 headers), named here so they are deliberate.
  A body that stalls is the handler's business: ``edge.body.read_body`` bounds it with
  the same timeout (408), and the connection then closes without reading the rest.
- ``GatewayRunner``: an ``AppRunner`` whose connections answer what aiohttp's HTTP parser
  refuses (oversized or too many headers, a bad request line, conflicting Content-Length
  and Transfer-Encoding, bad chunk framing in the headers) in the API's JSON error shape
  instead of aiohttp's plain text. These requests never reach the app: no route, no
  middleware, no request id; the OpenAI shape is used, as no path was read. Its
  connections drain within the runner's ``shutdown_timeout`` (``--shutdown-timeout-s``)
  once, then cancel what still runs.
- ``BoundedResponse``: the one kind of response that streams (SSE answers, the router's
  relay). Each write (and the final one) must be accepted by the client within
  ``--write-timeout``; a client that stops reading holds the handler (and its engine
  request) no longer than that. A write that times out, or finds the connection gone,
  raises ``ClientGone`` and marks the request (``RequestContext.gone``) for the metrics
  and the log line the middleware writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from kvgate.gateway.edge.context import CTX, edge_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.protocol.errors import ApiError, error_body

MAX_LINE_SIZE = 8190  # request line and each header line, bytes
MAX_FIELD_SIZE = 8190  # one header's value, bytes
MAX_HEADERS = 128


def handler_args(read_timeout_s: float) -> dict[str, Any]:
    return {"keepalive_timeout": float(read_timeout_s),
            "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
            "max_headers": MAX_HEADERS}


class _JsonErrors(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        self.log_debug("refused a malformed request: %s", message or exc)
        reason = (getattr(exc, "message", None) or message or "Bad request").strip()
        err = ApiError(status, f"The HTTP request is malformed: {reason[:200]}.",
                       code="bad_http_request")
        resp = web.Response(status=status, text=json.dumps(error_body("/", err)),
                            content_type="application/json")
        resp.force_close()
        return resp

    def abandon_body(self) -> None:
        """The rest of the request's body will not be read (it stalled, or its framing is
        broken): the connection closes once the answer is sent, without aiohttp's
        "lingering" read of what is left (up to 10 s more of a client that is trickling
        its body, after its 408)."""
        self._lingering_time = 0.0
        self.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """One drain window, not two. aiohttp's own waits ``timeout`` for the request in
        progress, then fails that request's body (which a streaming handler is not
        reading) and waits ``timeout`` again before it cancels the handler: a stream whose
        client stopped reading held a SIGTERM's drain for twice ``--shutdown-timeout-s``.
        Here the handler is cancelled when the window ends, and aiohttp's shutdown then
        waits only for what the cancelled handler does on its way out (its bill)."""
        task = self._task_handler
        if timeout and self._request_in_progress and task is not None and not task.done():
            self._force_close = True  # the connection ends with this request
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
        await super().shutdown(timeout)


def abandon_body(request: web.BaseRequest) -> None:
    """What is left of the request's body will not be read (it stalled, or broke its
    framing): the connection closes once the answer is sent, without
    reading the rest first (``_JsonErrors.abandon_body``; a plain aiohttp connection just
    closes after its lingering read)."""
    protocol = request.protocol
    if isinstance(protocol, _JsonErrors):
        protocol.abandon_body()
    else:
        protocol.close()


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` with JSON errors from the protocol layer (see the module doc)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


def _small_buffers(request: web.BaseRequest, nbytes: int) -> None:
    """Caps the connection's kernel send buffer and the transport's own at ``nbytes``, so a
    client that stops reading blocks the writes after that much, not after the megabytes a
    loopback or fast link's autotuned buffer holds."""
    transport = request.transport
    if not nbytes or transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
    with contextlib.suppress(AttributeError, ValueError):
        transport.set_write_buffer_limits(high=nbytes)


class BoundedResponse(web.StreamResponse):
    """A streamed response whose writes are bounded by the write timeout (module doc)."""

    def __init__(self, request: web.Request, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._request = request
        timeout = float(edge_of(request).http.write_timeout)
        self.write_timeout: float | None = timeout if math.isfinite(timeout) \
            and timeout > 0 else None

    def headers_with_body(self) -> None:
        """Send the headers with the first body bytes, in one write, instead of on their
        own at ``prepare``: for a whole answer (not an event stream), where a separate
        write of the headers only wakes the client once more for nothing it can use."""
        self._send_headers_immediately = False  # aiohttp's own switch (``web.Response``'s)

    async def prepare(self, request: web.BaseRequest) -> Any:
        if not self.prepared:
            _small_buffers(request, edge_of(self._request).http.stream_send_buffer_bytes)
        return await super().prepare(request)

    async def write(self, data: Any) -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                await super().write(data)
        except TimeoutError:
            raise self._stalled() from None
        except (ConnectionError, RuntimeError) as exc:  # closed, or closing under us
            raise self._gone() from exc

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            async with asyncio.timeout(self.write_timeout):
                await super().write_eof(data)
        except TimeoutError:
            raise self._stalled() from None
        except (ConnectionError, RuntimeError) as exc:
            raise self._gone() from exc

    def _gone(self, why: str = "hangup") -> ClientGone:
        ctx = self._request.get(CTX)
        if ctx is not None and ctx.gone is None:
            ctx.gone = why
        return ClientGone()

    def _stalled(self) -> ClientGone:
        """The client accepted nothing for the write timeout: the connection is dropped (its
        socket holds a half-written answer; nothing more can follow on it)."""
        self.force_close()
        transport = self._request.transport
        if transport is not None:
            transport.abort()
        return self._gone("write_timeout")


def cannot_listen(host: str, port: int | None) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. another server holds it), or None."""
    if not port:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                probe.bind(addr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None
