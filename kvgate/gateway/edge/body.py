"""Request bodies off the socket: read within the read timeout, parsed and prepared on
the event loop when small, on a bounded worker pool when big."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from kvgate.gateway.edge.context import edge_of
from kvgate.gateway.edge.transport import abandon_body
from kvgate.gateway.protocol.body import parse_json
from kvgate.gateway.protocol.errors import ApiError, bad_request

T = TypeVar("T")


OFFLOAD_BYTES = 64 * 1024  # bodies above this are parsed and prepared off the event loop


# Request preparation (JSON parse, chat template, tokenizing) of big bodies; the tokenizer
# releases the GIL, so the event loop keeps answering meanwhile. Bounded: a flood of big
# prompts queues here, not on the loop.
_PREPARE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvgate-prepare")


async def read_body(request: web.Request) -> bytes:
    """The raw body (within the app's size limit), read only after admission: a 408 when it
    does not arrive within the read timeout (the connection is then closed), a 400 when its
    framing is broken (chunked encoding, a short Content-Length)."""
    timeout = edge_of(request).http.read_timeout_s
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        abandon_body(request)  # what is left of the body is never read: not reusable
        raise ApiError(408, f"The request body did not arrive within {timeout}s.",
                       code="request_timeout") from None
    except HttpProcessingError as exc:
        abandon_body(request)
        raise bad_request(f"The request body is malformed: {exc.message}.",
                          code="bad_http_request") from None
    except RequestPayloadError as exc:  # e.g. a Content-Encoding its bytes do not decode as
        request.protocol.close()  # (after aiohttp's lingering read: the client may still
        # be sending at full speed, and a close under it would reset the 400 away)
        raise bad_request(f"The request body cannot be read: {exc}.",
                          code="bad_http_request") from None


async def prepare(raw: bytes | dict, build: Callable[[dict], T]) -> T:
    """Parse ``raw`` and run ``build`` (validation, chat template, tokenizing) on it: inline
    for small bodies (a thread hop costs more than the work), on a worker thread for big
    ones so the event loop stays free. ``build`` must only read shared state. A body parsed
    already (one that names an explicit cache, its prefix put in) is built on a worker
    thread."""
    loop = asyncio.get_running_loop()
    if isinstance(raw, dict):
        body = raw
        return await loop.run_in_executor(_PREPARE, lambda: build(body))
    if len(raw) <= OFFLOAD_BYTES:
        return build(parse_json(raw))
    return await loop.run_in_executor(_PREPARE, lambda: build(parse_json(raw)))


async def off_loop(work: Callable[[], T]) -> T:
    """``work`` on the same bounded pool as big bodies' preparation (the router renders
    and hashes big prompts there): however many big bodies arrive at once, a few threads
    work on them and the rest queue."""
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, work)


async def read_json(request: web.Request) -> dict:
    """Any Content-Type is read as JSON: `curl -d` sends a form type and users forget -H."""
    return await prepare(await read_body(request), lambda body: body)
