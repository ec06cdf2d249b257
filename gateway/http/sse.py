"""Server-sent events: the framing both SDKs parse."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.http.errors import ClientGone


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, data: dict | str, event: str | None = None) -> None:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    frame = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
    try:
        await resp.write(frame.encode())
    except (ConnectionResetError, RuntimeError) as exc:
        raise ClientGone() from exc
