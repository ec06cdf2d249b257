"""The operator console (``/admin/ui``): a page with no data of its own that draws what
the admin API returns, and the admin endpoints that exist for it (usage over time, the
cache history of this process, a tenant's hottest prefixes)."""

from __future__ import annotations

from aiohttp import web

from kvgate.gateway.edge.security import is_console_path
from kvgate.gateway.http.console import api, pages
from kvgate.gateway.http.console.history import CacheHistory, sampler
from kvgate.gateway.http.console.pages import is_console_request


def routes() -> list[web.RouteDef]:
    return [*pages.routes(), *api.routes()]


def setup(app: web.Application, history: CacheHistory | None = None) -> None:
    """Sample the cache into ``history`` while the app runs; call after the context that
    opens the engine is appended, so the first sample finds it open."""
    app.cleanup_ctx.append(sampler(history or CacheHistory()))


__all__ = ["CacheHistory", "is_console_path", "is_console_request", "routes", "setup"]
