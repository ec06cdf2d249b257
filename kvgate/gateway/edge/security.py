"""The operator console's security headers: every answer under its path, errors included,
from a replica (which serves it) or a router (which answers there with errors only)."""

from __future__ import annotations

from aiohttp import web

CONSOLE_PATH = "/admin/ui"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def is_console_path(path: str) -> bool:
    """Under the console's prefix: every answer there (404s, 405s, 401s too) carries the
    security headers."""
    return path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/")


def add_security_headers(response: web.StreamResponse) -> None:
    """Set on every console answer before its first byte (errors included)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def console_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` hook: the headers on every answer under the console's
    path."""
    if is_console_path(request.path):
        add_security_headers(response)
