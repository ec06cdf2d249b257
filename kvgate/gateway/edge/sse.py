"""Server-sent events: the framing both SDKs parse. Every event goes out through
``send`` on a ``transport.BoundedResponse``, whose writes the write timeout bounds."""

from __future__ import annotations

import contextlib
import json

from aiohttp import web

from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.edge.transport import BoundedResponse
from kvgate.gateway.protocol.errors import ApiError, stream_error_event

# The request's event stream, once its headers are sent: from then on an error can only
# be told as an event (``end_stream_with_error``), never as a response of its own.
OPEN_STREAM = web.RequestKey("kvgate_open_stream", web.StreamResponse)


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = BoundedResponse(request, headers={"Content-Type": "text/event-stream",
                                             "Cache-Control": "no-cache",
                                             "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    request[OPEN_STREAM] = resp
    return resp


async def send(resp: web.StreamResponse, data: dict | str, event: str | None = None) -> None:
    """One event; ``ClientGone`` when the client hung up or stopped reading."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    frame = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
    try:
        await resp.write(frame.encode())
    except (ConnectionError, RuntimeError) as exc:  # ClientGone is a ConnectionError
        if isinstance(exc, ClientGone):
            raise
        raise ClientGone() from exc


async def end_stream_with_error(resp: web.StreamResponse, path: str, err: ApiError) -> None:
    """The last event of a stream that failed after its first byte, in the API's error
    shape; the connection then closes (no ``[DONE]``, no ``message_stop``: the client must
    not take the answer for complete). A client already gone is left alone."""
    resp.force_close()
    event, data = stream_error_event(path, err)
    with contextlib.suppress(ClientGone, ConnectionError, RuntimeError):
        await send(resp, data, event)
        await resp.write_eof()
