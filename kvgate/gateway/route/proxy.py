"""Forwarding one client request to a replica and its answer back, byte for byte.

- The chosen replica first (``choose``), the others in order when it cannot take the
  request: a connection that could not be made, or a 503 (overloaded, not ready, ledger
  away) answered before any body — the request never started there, so nothing was billed.
- Anything else is the answer: status, headers and body pass through as they arrive (SSE
  events unbuffered; a whole answer's headers with its first body bytes, in one write). A
  replica that goes away after the request reached it is never retried (it may have run
  and billed the request): the client gets a 502 (a 504 for one silent for
  ``--upstream-idle-timeout-s``), or, once the answer had started (a stream's headers, a
  whole answer's first bytes), the connection closes as the replica's did. So a stream is never
  duplicated and a request is billed at most once, by the replica that answered.
- A client that stops reading is cut after ``--write-timeout`` (``BoundedResponse``),
  which closes the replica connection: the replica stops and bills what it produced.
- The router bills nothing. A client's sane ``x-request-id`` is sent on, so the replica
  answers under it; without one, the replica's own id (its ledger row's) is the answer's,
  and the router's logs name it once the replica's headers arrived (before, its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from kvgate.gateway.edge.context import ctx_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.edge.middleware import SANE_ID
from kvgate.gateway.edge.sse import OPEN_STREAM, end_stream_with_error
from kvgate.gateway.edge.transport import BoundedResponse
from kvgate.gateway.protocol.errors import ApiError
from kvgate.gateway.route.pool import Replica, describe

log = logging.getLogger("kvgate.route")

# Hop-by-hop headers (RFC 9110 7.6.1), those the router sets itself, and ``Expect`` (the
# router has read the whole body already; a replica must not wait to be asked for it).
_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                  "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
                  "content-length", "x-request-id", "expect"))
_REFUSED = 503  # a replica's "not now", always before any body
# The events that end a stream in each API (OpenAI's chat and completions, its Responses
# API, Anthropic's Messages; an error event ends any): a client may close as soon as one
# has reached it, before the replica's end of the body does.
# Each at a line's start: a data line's JSON holds no raw newline, so no text a model
# writes can spell one.
_LAST_EVENTS = tuple(b"\n" + e for e in (
    b"data: [DONE]", b"event: message_stop", b"event: response.completed",
    b"event: response.incomplete", b"event: response.failed", b"event: error"))
# Set on the request once the answer's last event was relayed (``until_client_gone`` then
# leaves a client that closes alone: its answer is whole, it did not hang up).
ANSWER_ENDED = web.RequestKey("kvgate_answer_ended", bool)
_RETRY_AFTER_S = 1.0


@dataclass
class Attempt:
    """A request as sent on: method, path with query, headers, body."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


def _hop_by_hop(headers: CIMultiDict[str] | CIMultiDictProxy[str]) -> frozenset[str]:
    """The fixed hop-by-hop headers and those the ``Connection`` header names."""
    named = {t.strip().lower() for v in headers.getall("Connection", [])
             for t in v.split(",") if t.strip()}
    return _HOP | named


def attempt_of(request: web.Request, body: bytes) -> Attempt:
    hop = _hop_by_hop(request.headers)
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items()
        if k.lower() not in hop and k.lower() != "x-forwarded-for")
    ctx = ctx_of(request)
    if ctx.public_id != ctx.request_id:  # the client's own: the replica answers under it
        headers["x-request-id"] = ctx.public_id
    # else none: the replica's id is then its ledger row's, and the answer carries it
    peer = request.remote or ""
    prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    return Attempt(request.method, request.path_qs, headers, body)


async def forward(request: web.Request, session: aiohttp.ClientSession,
                  replicas: list[Replica], attempt: Attempt,
                  on_down: Callable[[Replica, str], None],
                  idle_timeout_s: float = 300.0,
                  parts: list[tuple[str, float]] | None = None,
                  on_status: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Try ``replicas`` in order; the first that takes the request answers the client.
    ``parts``: the router's own steps so far (name, seconds), for ``server-timing``.
    ``on_status``: called with the answer's status before its first byte leaves (what the
    router learns from it is learnt before the client can send its next request)."""
    refused: tuple[int, bytes, CIMultiDict[str]] | None = None
    timing = [("router", time.monotonic() - ctx_of(request).t0), *(parts or [])]
    for i, replica in enumerate(replicas):
        last = i == len(replicas) - 1
        replica.inflight += 1
        t_sent = time.monotonic()
        try:
            try:  # (a whole answer's headers come when it is done: as long as a pause)
                async with asyncio.timeout(idle_timeout_s):
                    upstream = await session.request(
                        attempt.method, replica.url + attempt.path_qs,
                        headers=attempt.headers, data=attempt.body, allow_redirects=False)
            except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
                on_down(replica, describe(exc))
                continue  # never reached it: safe to try the next one
            except TimeoutError:  # it has the request and said nothing: cut (it stops and
                # bills what it did), never retried elsewhere (it may have run)
                raise _no_answer(idle_timeout_s) from None
            except aiohttp.ClientError as exc:  # it had the request, then went away
                on_down(replica, f"went away: {describe(exc)}")
                raise _went_away() from None
            try:
                if upstream.status == _REFUSED and not last:
                    try:  # (bounded as any other wait on a replica)
                        async with asyncio.timeout(idle_timeout_s):
                            body = await upstream.read()
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        log.warning("replica %s: its 503 broke off: %s", replica.url, describe(exc))
                        upstream.close()
                        continue  # a refusal all the same: it ran nothing
                    refused = (upstream.status, body, CIMultiDict(upstream.headers))
                    continue
                replica.sent += 1
                timing.append(("upstream", time.monotonic() - t_sent))
                ctx_of(request).engine_s += timing[-1][1]  # the replica's time, not ours
                theirs = upstream.headers.get("x-request-id")
                if theirs and SANE_ID.match(theirs):  # logs and errors from here on
                    ctx_of(request).public_id = theirs
                return await _relay(request, upstream, timing, idle_timeout_s, on_status)
            finally:
                upstream.release()
        finally:
            replica.inflight -= 1
    if refused is not None:  # every replica said "not now": the last one's answer
        status, body, headers = refused
        resp = web.Response(status=status, body=body)
        _copy_headers(headers, resp)
        return resp
    raise ApiError(503, "No replica can take the request now; retry shortly.",
                   code="no_replica_available", retry_after=_RETRY_AFTER_S)


def _no_answer(idle_timeout_s: float) -> ApiError:
    return ApiError(504, f"The replica sent no answer in {idle_timeout_s:g} s; the request "
                    "may have run. Retry it if it is safe to.", code="upstream_timeout")


def _went_away() -> ApiError:
    return ApiError(502, "The replica went away before answering; the request may have "
                    "run. Retry it if it is safe to.", code="upstream_failed")


def _copy_headers(src: CIMultiDict[str] | CIMultiDictProxy[str],
                  resp: web.StreamResponse) -> None:
    hop = _hop_by_hop(src)
    for k, v in src.items():
        if k.lower() not in hop or k.lower() == "x-request-id":
            resp.headers.add(k, v)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse,
                 timing: list[tuple[str, float]], idle_timeout_s: float,
                 on_status: Callable[[int], None] | None = None) -> web.StreamResponse:
    """``timing``: ``router`` (its time before the first try), its parts (``render``,
    ``choose``) and ``upstream`` (from sending to the replica's headers) in ``server-timing``
    after the replica's own entries, each part as ``router-<name>``."""
    resp = BoundedResponse(request, status=upstream.status, reason=upstream.reason)
    _copy_headers(upstream.headers, resp)
    theirs = upstream.headers.get("server-timing")
    own = ", ".join(f"{name if name == 'router' else 'router-' + name};dur={s * 1000.0:.2f}"
                    for name, s in timing)
    resp.headers["server-timing"] = f"{theirs}, {own}" if theirs else own
    chunked = upstream.headers.get("Transfer-Encoding", "").lower() == "chunked"
    if upstream.content_length is not None and not chunked:
        resp.content_length = upstream.content_length
    events = resp.content_type == "text/event-stream"
    chunk: bytes | None = None  # the next bytes to relay; None: read them
    if not events:  # a whole answer: its headers leave with its first bytes, one write
        # Those are read first: until they come the client has been sent nothing, so a
        # replica that goes away or falls silent now is a 502 or 504 in the API's shape
        # (headers held for bytes that never came were an empty reply, no status at all).
        chunk = await _first_bytes(request, upstream, idle_timeout_s)
        resp.headers_with_body()
    request[OPEN_STREAM] = resp  # a client that hangs up: the middleware closes it
    if on_status is not None:
        on_status(upstream.status)
    await resp.prepare(request)
    tail = b""
    try:
        while True:  # a replica that stops sending mid-answer: cut after the idle timeout
            if chunk is None:
                chunk = await _read(request, upstream, idle_timeout_s)
            if not chunk:
                break
            if events and not request.get(ANSWER_ENDED):  # (before the write: the
                # client may have it and close while the write is still being awaited)
                recent = (tail or b"\n") + chunk  # the stream's start is a line's
                if any(e in recent for e in _LAST_EVENTS):
                    request[ANSWER_ENDED] = True
                tail = recent[-64:]
            else:
                tail = chunk[-64:]
            await resp.write(chunk)
            chunk = None
        await resp.write_eof()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError, TimeoutError) as exc:
        log.warning("request %s: the replica's answer broke off: %s",
                    ctx_of(request).public_id, describe(exc))
        upstream.close()
        await _broken(request, resp, tail[-2:])
    except (ClientGone, ConnectionError):
        if not request.get(ANSWER_ENDED):
            raise  # a client that hung up mid-answer (the middleware counts it)
        ctx_of(request).gone = None  # it had the whole answer and closed first
    return resp


async def _read(request: web.Request, upstream: aiohttp.ClientResponse,
                idle_timeout_s: float) -> bytes:
    """The replica's next bytes, within the idle timeout. The wait counts as the replica's
    time (``engine_s``): the router's ``kvgate_gateway_overhead_seconds`` is its own."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(idle_timeout_s):
            return await upstream.content.readany()
    finally:
        ctx_of(request).engine_s += time.monotonic() - t0


async def _first_bytes(request: web.Request, upstream: aiohttp.ClientResponse,
                       idle_timeout_s: float) -> bytes:
    """A whole answer's first bytes (b"": its body is empty), before anything is sent to
    the client: a replica that goes away or falls silent first is the router's own 502 or
    504, as before its headers came."""
    try:
        return await _read(request, upstream, idle_timeout_s)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError, TimeoutError) as exc:
        log.warning("request %s: the replica's answer broke off before its first byte: %s",
                    ctx_of(request).public_id, describe(exc))
        upstream.close()
        if isinstance(exc, TimeoutError):
            raise _no_answer(idle_timeout_s) from None
        raise _went_away() from None


async def _broken(request: web.Request, resp: web.StreamResponse, tail: bytes) -> None:
    """End an answer whose replica went away mid-way as a replica ends a failed stream: an
    error event in the API's shape, no ``[DONE]``; a plain body is cut (the client sees
    fewer bytes than announced). Never a second answer."""
    if resp.content_type != "text/event-stream":
        if request.transport is not None:
            request.transport.abort()
        return
    if tail and tail != b"\n\n":
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write(b"\n\n")  # close the event the replica left half-sent
    await end_stream_with_error(resp, request.path, ApiError(
        502, "The replica serving this answer went away; it is incomplete.",
        code="upstream_failed"))
