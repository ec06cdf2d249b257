"""``/metrics``, for the operator: on the API port (admin key or metrics key) or alone on a
port of its own (``--metrics-port``)."""

from __future__ import annotations

import hmac

from aiohttp import web

from kvgate.gateway.edge.context import EDGE, Edge, edge_of
from kvgate.gateway.edge.errors import error_response
from kvgate.gateway.edge.middleware import context_middleware, on_response_prepare
from kvgate.gateway.ledger import LedgerUnavailable
from kvgate.gateway.protocol.errors import ApiError


async def metrics_endpoint(request: web.Request) -> web.Response:
    """/metrics on the API port: absent when a metrics port is set (served only there)."""
    edge = edge_of(request)
    if edge.metrics_settings.metrics_port is not None:
        raise web.HTTPNotFound()
    return await _scrape(request, edge, own_port=False)


async def _scrape(request: web.Request, edge: Edge, own_port: bool) -> web.Response:
    """The scrape, for the operator only: it names tenants (by id) and what they spend.
    With ``metrics_key`` set, that key (or the admin key) is required; without it the
    metrics port is open (its network reach is the control) and the API port asks for the
    admin key."""
    try:
        allowed = await _may_read_metrics(request, edge, own_port)
    except LedgerUnavailable:  # an admin key not looked up lately, with the database away
        return error_response(request.path, ApiError(
            503, "The key cannot be checked now: the ledger database is unavailable; the "
            "metrics key (KVGATE_METRICS_KEY) works without it.", code="ledger_unavailable",
            retry_after=5.0))
    if not allowed:
        err = ApiError(401, "/metrics needs 'Authorization: Bearer <key>' with the metrics "
                       "key (KVGATE_METRICS_KEY) or the admin key.", code="metrics_key_required")
        response = error_response(request.path, err)
        response.headers["WWW-Authenticate"] = 'Bearer realm="kvgate metrics"'
        return response
    await edge.metrics.refresh()
    return web.Response(body=edge.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _may_read_metrics(request: web.Request, edge: Edge, own_port: bool) -> bool:
    auth = request.headers.get("Authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not (key.isascii() and key.isprintable()):
        return False  # no key we issued (undecodable header bytes arrive as surrogates)
    metrics_key = edge.metrics_settings.metrics_key
    if metrics_key and key and hmac.compare_digest(key.encode(), metrics_key.encode()):
        return True
    if not metrics_key and own_port:
        return True  # the metrics port with no key: open to whoever can reach it
    if not key:
        return False
    principal = await edge.ledger.authenticate(key)
    return principal is not None and principal.role == "admin"


async def metrics_listener(edge: Edge, host: str) -> web.AppRunner:
    """``--metrics-port``: /metrics alone on its own listener, for the scraper."""
    app = web.Application(middlewares=[context_middleware])  # its errors in the API shape
    app[EDGE] = edge
    app.on_response_prepare.append(on_response_prepare)

    async def scrape(request: web.Request) -> web.Response:
        return await _scrape(request, edge, own_port=True)

    app.add_routes([web.get("/metrics", scrape, allow_head=False)])
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, edge.metrics_settings.metrics_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    edge.metrics.listen_port = runner.addresses[0][1]
    return runner
