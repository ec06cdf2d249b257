"""The aiohttp application: route table, middlewares, and the engine/ledger lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.config import Settings
from gateway.engine import Engine, EngineConfig
from gateway.http import admin, anthropic_api, openai_api
from gateway.http.errors import ApiError
from gateway.http.limits import Limiter
from gateway.http.metrics import Metrics
from gateway.http.middleware import auth_middleware, context_middleware, on_response_prepare
from gateway.http.openapi import spec
from gateway.http.state import STATE, AppState, state_of
from gateway.ledger import Ledger, LedgerError, migrates_on_start

log = logging.getLogger("kvgate.http")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state: AppState = state_of(request)
    try:
        await state.ledger.ping()
    except LedgerError as exc:
        raise ApiError(503, f"ledger unreachable: {exc}", code="not_ready",
                       retry_after=1.0) from None
    return web.json_response({"status": "ready", "model": state.engine.model_id})


async def metrics(request: web.Request) -> web.Response:
    body = state_of(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; "
                                                            "charset=utf-8"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


def _routes() -> list[web.RouteDef]:
    return [
        web.get("/healthz", healthz, allow_head=False),
        web.get("/readyz", readyz, allow_head=False),
        web.get("/metrics", metrics, allow_head=False),
        web.get("/openapi.json", openapi, allow_head=False),
        web.get("/v1/models", openai_api.list_models, allow_head=False),
        web.post("/v1/chat/completions", openai_api.chat_completions),
        web.post("/v1/completions", openai_api.completions),
        web.post("/v1/messages", anthropic_api.messages),
        *admin.routes(),
    ]


def engine_config(settings: Settings) -> EngineConfig:
    """The server's settings the engine acts on (the engine never reads ``Settings``)."""
    return EngineConfig(
        model=settings.model, device=settings.device, dtype=settings.dtype,
        device_cache_bytes=settings.device_cache_bytes,
        host_cache_bytes=settings.host_cache_bytes, block_size=settings.block_size,
        max_batch_tokens=settings.max_batch_tokens, max_running=settings.max_running,
        max_queue=settings.max_queue,
        default_cache_ttl_seconds=float(settings.default_cache_ttl_seconds))


def create_app(settings: Settings, engine: Engine | None = None,
               ledger: Ledger | None = None) -> web.Application:
    """Engine and ledger passed in are used as they are and left open at shutdown (the
    caller owns them); those the app creates itself it also closes."""
    state = AppState(settings=settings, metrics=Metrics(settings.metrics_tenant_labels),
                     limiter=Limiter(settings.max_queue + settings.max_running))
    app = web.Application(middlewares=[context_middleware, auth_middleware],
                          client_max_size=settings.max_body_bytes)
    app[STATE] = state
    app.add_routes(_routes())
    app.on_response_prepare.append(on_response_prepare)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own_ledger = ledger or await Ledger.open(settings.db,
                                                 migrate=migrates_on_start(settings.db))
        own_engine: Engine | None = None
        try:
            state.admin_key_created = await own_ledger.bootstrap_admin(settings.admin_key)
            the_engine = engine
            if the_engine is None:
                own_engine = the_engine = Engine(engine_config(settings))
                await own_engine.start()
            state.open(the_engine, own_ledger)
            own_ledger.on_commit = state.metrics.on_ledger_commit
            state.metrics.watch(state.engine, own_ledger)
            yield
        finally:
            if own_engine is not None:
                await own_engine.stop()
            if ledger is None:
                await own_ledger.close()

    app.cleanup_ctx.append(resources)
    return app
