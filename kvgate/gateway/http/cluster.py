"""What a ``kvgate serve`` replica offers the routing tier (admin key only):

- ``GET /admin/load``: its identity (replica id, epoch, model id, block size), its load
  (queue depth, running sequences, free device pages) and the number of its last cache
  event (``event_seq``); routers poll it as the health check, and a router whose view of
  this replica claims more events than that was fed events it never made (it resyncs).
- ``GET /admin/cache/snapshot``: every indexed block (namespace-scoped hash and tier) and
  the number of the last cache event before it, for a router that missed events.
- With ``--events-url``, the cache events publisher (``events.EventPublisher``), its
  batches signed with the deployment's events secret (``events.key_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from kvgate.gateway.http.publisher import EventPublisher
from kvgate.gateway.http.state import STATE, state_of
from kvgate.gateway.protocol.wire import ReplicaLoad, key_for, new_epoch, snapshot_body

EPOCH = web.AppKey("kvgate_replica_epoch", str)


def replica_id_of(host: str, port: int, configured: str) -> str:
    """``--replica-id``, else the address it serves on (a port the OS picked is unknown
    when this is asked, so then the host name and process id)."""
    if configured:
        return configured
    if port:
        return f"http://{host}:{port}"
    return f"{socket.gethostname()}:{os.getpid()}"


async def load(request: web.Request) -> web.Response:
    state = state_of(request)
    engine = state.engine
    figures = await engine.load()
    return web.json_response(ReplicaLoad(
        replica_id=state.settings.events.replica_id, epoch=request.app[EPOCH],
        model_id=engine.model_id, block_size=engine.block_size,
        events=bool(state.settings.events.events_url), **figures,
    ).body())


async def snapshot(request: web.Request) -> web.Response:
    state = state_of(request)
    engine = state.engine
    seq, blocks = await engine.snapshot()
    return web.json_response(snapshot_body(
        state.settings.events.replica_id, request.app[EPOCH], seq, engine.model_id,
        engine.block_size, blocks))


def routes() -> list[web.RouteDef]:
    return [web.get("/admin/load", load, allow_head=False),
            web.get("/admin/cache/snapshot", snapshot, allow_head=False)]


def setup(app: web.Application) -> None:
    """Mount the routes; after the engine is open, publish its cache events if asked.
    Raises ``EventsMisconfigured`` for events with neither a secret nor the opt-out."""
    settings = app[STATE].settings
    key = key_for(settings.events.events_url, settings.events.events_secret, settings.remote_tier.shared_tier_secret,
                  settings.events.events_unsigned, "kvgate serve")
    settings.events.replica_id = replica_id_of(settings.http.host, settings.http.port, settings.events.replica_id)
    app[EPOCH] = new_epoch()
    app.add_routes(routes())

    async def events(app: web.Application) -> AsyncIterator[None]:
        if not settings.events.events_url:
            yield
            return
        publisher = EventPublisher(settings.events.events_url, settings.events.replica_id, app[EPOCH], key)
        engine = app[STATE].engine
        engine.set_event_sink(publisher.record)
        task = asyncio.create_task(publisher.run(), name="kvgate-cache-events")
        try:
            yield
        finally:
            engine.set_event_sink(None)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await publisher.close()

    app.cleanup_ctx.append(events)
