"""The console's page and assets, served from the package with strict security headers.

The page carries no data: it is public, and everything it shows comes from the admin API,
called by its script with the admin key the operator typed (kept in the tab's session
storage, sent as a Bearer header, never in a cookie, so no other site can ride on it).
Assets are a fixed list; a name not on it is a 404, so no path reaches the file system.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

from kvgate.gateway.edge.security import (
    CONSOLE_PATH,
    SECURITY_HEADERS,
)
from kvgate.gateway.protocol.errors import ApiError

PAGE = CONSOLE_PATH
ASSETS = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
}


def is_console_request(request: web.Request) -> bool:
    """The page or one of its assets: public (they hold no data), so outside the key
    check. Decided by the route the request resolved to, not by the path's text, so no
    spelling of a path (encoded dots or slashes, doubled slashes) that the router hands
    to another handler is ever let through without a key."""
    route = request.match_info.route
    return (request.method == "GET" and route.handler in (page, asset)
            and (route.resource is not None and route.resource.canonical in _PUBLIC_ROUTES))


@cache
def _read(name: str) -> bytes:
    return resources.files("kvgate.gateway.http.console").joinpath("static", name).read_bytes()


def _response(body: bytes, content_type: str, cache_control: str) -> web.Response:
    response = web.Response(body=body, content_type=content_type,
                            charset="utf-8" if content_type.startswith("text/") else None)
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = cache_control
    return response


async def page(request: web.Request) -> web.Response:
    return _response(_read("index.html"), "text/html", "no-store")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        # the name is not echoed: nothing a link's author chose comes back in the body
        raise ApiError(404, "No such console asset.", code="not_found")
    return _response(_read(name), content_type, "no-cache")


_PUBLIC_ROUTES = frozenset((PAGE, PAGE + "/", PAGE + "/static/{name}"))


def routes() -> list[web.RouteDef]:
    return [
        web.get(PAGE, page, allow_head=False),
        web.get(PAGE + "/", page, allow_head=False),
        web.get(PAGE + "/static/{name}", asset, allow_head=False),
    ]
