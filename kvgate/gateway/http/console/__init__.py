"""The operator console (``/admin/ui``): a page with no data of its own that draws what
the admin API returns, and the admin endpoints that exist for it (usage over time, the
cache history of this process, a tenant's hottest prefixes)."""

from __future__ import annotations

from aiohttp import web

from kvgate.gateway.http.console import api, pages
from kvgate.gateway.http.console.history import CacheHistory, sampler
from kvgate.gateway.http.console.pages import (
    add_security_headers,
    is_console_path,
    is_console_request,
)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """The console's answers, errors too: CSP, no framing, nosniff."""
    if is_console_path(request.path):
        add_security_headers(response)


def routes() -> list[web.RouteDef]:
    return [*pages.routes(), *api.routes()]


def setup(app: web.Application, history: CacheHistory | None = None) -> None:
    """Sample the cache into ``history`` while the app runs; call after the context that
    opens the engine is appended, so the first sample finds it open."""
    app.cleanup_ctx.append(sampler(history or CacheHistory()))


__all__ = ["CacheHistory", "is_console_path", "is_console_request", "on_response_prepare",
           "routes", "setup"]
