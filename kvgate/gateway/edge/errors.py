"""Errors on the wire: ``ApiError`` as a response in the API's shape, aiohttp's own
404/405/413 turned into API errors, and ``ClientGone`` for a client that left."""

from __future__ import annotations

import json
import math

from aiohttp import web

from kvgate.gateway.protocol.errors import ApiError, error_body


class ClientGone(ConnectionError):
    """The client closed the connection, or accepted no bytes for the write timeout
    (``transport.BoundedResponse``); nothing more can be sent. A ``ConnectionError``, so
    aiohttp's own last write of a response treats it as the hang-up it is."""


def error_response(path: str, err: ApiError) -> web.Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.retry is not None:
        headers["x-should-retry"] = "true" if err.retry else "false"
    return web.Response(status=err.status, text=json.dumps(error_body(path, err)),
                        content_type="application/json", headers=headers)


def from_http_exception(exc: web.HTTPException) -> ApiError:
    """aiohttp's own 404/405/413 become API errors with a message that says what to do."""
    if exc.status == 404:
        return ApiError(404, "Unknown path; see /openapi.json for the endpoints this server has.",
                        code="not_found")
    if exc.status == 405:
        return ApiError(405, f"Method not allowed; allowed: {exc.headers.get('Allow', '')}.",
                        code="method_not_allowed")
    if exc.status == 413:
        return ApiError(413, "Request body too large; send a smaller request.",
                        code="request_too_large")
    return ApiError(exc.status, exc.reason or "HTTP error")
