"""Cross-cutting work for every request: ids, timing, auth, error shaping, body limits."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from kvgate.gateway.edge.context import CTX, RequestContext, ctx_of, edge_of
from kvgate.gateway.edge.errors import ClientGone, error_response, from_http_exception
from kvgate.gateway.edge.sse import OPEN_STREAM, end_stream_with_error
from kvgate.gateway.ledger import LedgerUnavailable
from kvgate.gateway.protocol.errors import ApiError

log = logging.getLogger("kvgate.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LEDGER_RETRY_AFTER_S = 5.0  # ledger away or its spool full: what clients are told to wait
_PUBLIC = ("/healthz", "/health", "/readyz", "/openapi.json")  # /metrics checks its own key
_TENANT = ("/tokenize", "/detokenize")
RECEIPT_HEADER = "kvgate-receipt-id"  # vLLM's paths, outside /v1: tenant keys too


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: request id, timing, metrics, and every error in the API's own shape."""
    rid = new_request_id()
    client_id = request.headers.get("x-request-id", "")
    ctx = RequestContext(request_id=rid, t0=time.monotonic(),
                         public_id=client_id if SANE_ID.match(client_id) else rid)
    request[CTX] = ctx
    edge = edge_of(request)
    try:
        limit = edge.http.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"Request body is {request.content_length} bytes; the limit is "
                           f"{limit}.", code="request_too_large")
        response = await handler(request)
    except ApiError as err:
        response, status = await _error_reply(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response, status = await _error_reply(request, from_http_exception(exc))
    except RecursionError:  # JSON inside a string field (tool arguments, a schema) nested
        response, status = await _error_reply(request, ApiError(  # past Python's stack
            400, "A JSON value in the request is nested too deeply.", code="invalid_json"))
    except LedgerUnavailable as exc:  # the database and the spool both failed, or the file
        log.error("request %s: ledger unavailable: %s", rid, exc)  # was lost: retry later
        response, status = await _error_reply(request, ApiError(
            503, "The ledger is unavailable; retry shortly.", code="ledger_unavailable",
            retry_after=_LEDGER_RETRY_AFTER_S))
    except (ClientGone, ConnectionResetError):
        if ctx.gone is None:
            ctx.gone = "hangup"
        stream = request.get(OPEN_STREAM)
        if stream is not None:  # the status line is sent; nothing more can be
            stream.force_close()
        response, status = stream or web.Response(status=499), _gone(request)
        _observe(request, status)
        return response
    except Exception as exc:
        translated = edge.translate(request, exc)
        if translated is None:
            log.exception("request %s %s %s failed", rid, request.method, request.path)
            translated = ApiError(500, f"Internal server error (request id {ctx.public_id}).",
                                  code="internal_error")
        response, status = await _error_reply(request, translated)
    else:  # a stream whose client left: its handler ended it quietly
        status = response.status if ctx.gone is None else _gone(request)
    _observe(request, status)
    return response


# The status a request whose client left is counted under in kvgate_requests_total (its
# answer's status line, if sent, said 200): nginx's 499 for a hang-up, 408 for a client
# that stopped reading (the write timeout: the server gave up on it).
GONE_STATUS = {"hangup": 499, "write_timeout": 408}


def _gone(request: web.Request) -> int:
    """One INFO line for a client that left (not an error of the server's) and its status."""
    ctx = ctx_of(request)
    why = ctx.gone or "hangup"
    p = ctx.principal
    tokens = "no" if ctx.completion_tokens is None else str(ctx.completion_tokens)
    if why == "write_timeout":
        timeout = edge_of(request).http.write_timeout
        log.info("request %s (tenant %s): the client accepted no bytes for %gs, answer cut "
                 "(%s tokens produced)", ctx.request_id, p.tenant_id if p else None, timeout,
                 tokens)
    else:
        log.info("request %s (tenant %s): the client hung up (%s tokens produced)",
                 ctx.request_id, p.tenant_id if p else None, tokens)
    return GONE_STATUS.get(why, 499)


async def _error_reply(request: web.Request, err: ApiError) -> tuple[web.StreamResponse, int]:
    """The error as a response of its own, or, once a stream has sent its first byte, as
    the stream's last event (then the connection closes): never a second status line.
    Either way ``kvgate_requests_total`` counts the error's status."""
    stream = request.get(OPEN_STREAM)
    if stream is None or not stream.prepared:
        return error_response(request.path, err), err.status
    await end_stream_with_error(stream, request.path, err)
    return stream, err.status


def _endpoint(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def _observe(request: web.Request, status: int) -> None:
    m = edge_of(request).metrics
    endpoint = _endpoint(request)
    ctx = ctx_of(request)
    principal = ctx.principal
    tenant = m.tenant(principal.tenant_id if principal is not None else None)
    if m.counts(tenant):
        m.requests.labels(endpoint, str(status), tenant).inc()
    if request.path.startswith("/v1/"):
        total = time.monotonic() - ctx.t0
        m.overhead.labels(endpoint).observe(max(0.0, total - ctx.engine_s))


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streaming ones included (set before the first byte)."""
    ctx = request.get(CTX)
    response.headers["x-request-id"] = ctx.public_id if ctx else new_request_id()
    if ctx is not None:
        total_ms = (time.monotonic() - ctx.t0) * 1000.0
        engine_ms = ctx.engine_s * 1000.0
        timing = f"engine;dur={engine_ms:.1f}, total;dur={total_ms:.1f}"
        if ctx.ledger_s is not None:  # not on streams: their usage commits after the headers
            timing += f", ledger;dur={ctx.ledger_s * 1000.0:.1f}"
        response.headers["server-timing"] = timing
        if ctx.receipt_id is not None and response.status < 400:
            response.headers[RECEIPT_HEADER] = ctx.receipt_id


def _api_key(request: web.Request) -> str | None:
    """The key sent, or None. Keys are printable ASCII: anything else (a header with bytes
    that are not UTF-8 arrives with surrogates) is no key we could have issued."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
    else:
        key = request.headers.get("x-api-key", "")
    if key and not (key.isascii() and key.isprintable()):
        raise ApiError(401, "Invalid API key: keys are printable ASCII.",
                       code="invalid_api_key")
    return key or None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Key → principal. The key alone decides the tenant, and so the cache namespace."""
    path = request.path
    if path in _PUBLIC or edge_of(request).public(request) or not (
            path.startswith("/v1/") or path.startswith("/admin") or path in _TENANT):
        return await handler(request)
    key = _api_key(request)
    if key is None:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'.",
                       code="missing_api_key")
    ledger = edge_of(request).ledger
    try:
        principal = await ledger.authenticate(key)
    except LedgerUnavailable as exc:  # keys looked up lately still answer (KeyCache)
        log.warning("key lookup failed: %s", exc)
        raise ApiError(503, "The key cannot be checked now: the ledger database is "
                       "unavailable. Retry shortly.", code="ledger_unavailable",
                       retry_after=_LEDGER_RETRY_AFTER_S) from None
    if principal is None:
        raise ApiError(401, "Invalid or revoked API key.", code="invalid_api_key")
    ctx_of(request).principal = principal
    if path.startswith("/admin"):
        if principal.role != "admin":
            raise ApiError(403, "This route needs the admin key.", code="admin_only")
    elif principal.tenant_id is None:
        raise ApiError(403, "This key belongs to no tenant; use a tenant key for /v1 routes.",
                       code="no_tenant")
    elif principal.tenant_status != "active":
        raise ApiError(403, f"Tenant is {principal.tenant_status}.", code="tenant_inactive")
    elif request.method == "POST" and (refusing := ledger.refusing()) is not None:
        # usage could not be kept (see Ledger.refusing): serve nothing that would be billed
        raise ApiError(503, f"Not admitting requests: {refusing}. Retry shortly.",
                       code="ledger_unavailable", retry_after=_LEDGER_RETRY_AFTER_S)
    return await handler(request)
