"""The aiohttp application: route table, middlewares, and the engine/ledger lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.config import Settings
from gateway.http import admin, anthropic_api, openai_api
from gateway.http.errors import ApiError
from gateway.http.limits import Limiter
from gateway.http.metrics import Metrics
from gateway.http.middleware import auth_middleware, context_middleware, on_response_prepare
from gateway.http.openapi import spec
from gateway.http.state import STATE, AppState, state_of

log = logging.getLogger("kvgate.http")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state: AppState = state_of(request)
    problems = []
    if state.engine is None:
        problems.append("model not loaded")
    try:
        await state.ledger.ping()
    except Exception as exc:
        problems.append(f"ledger unreachable: {exc}")
    if problems:
        raise ApiError(503, "; ".join(problems), code="not_ready", retry_after=1.0)
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


def create_app(settings: Settings, engine: Any = None, ledger: Any = None) -> web.Application:
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
        own_ledger = ledger is None
        own_engine = engine is None
        if own_ledger:
            from gateway.http.backends import Ledger

            state.ledger = await Ledger.open(settings.db, migrate=settings.db.startswith("sqlite"))
        else:
            state.ledger = ledger
        try:
            state.admin_key_created = await state.ledger.bootstrap_admin(settings.admin_key)
            if own_engine:
                from gateway.http.backends import Engine, EngineConfig

                state.engine = Engine(EngineConfig.from_settings(settings))
                await state.engine.start()
            else:
                state.engine = engine
            _hook_ledger_metrics(state)
            state.metrics.watch(state.engine.cache_stats, state.engine, state.ledger)
            yield
        finally:
            if own_engine and state.engine is not None:
                await state.engine.stop()
            if own_ledger:
                await state.ledger.close()

    app.cleanup_ctx.append(resources)
    return app


def _hook_ledger_metrics(state: AppState) -> None:
    if hasattr(state.ledger, "on_commit"):
        try:
            state.ledger.on_commit = state.metrics.on_ledger_commit
        except AttributeError:
            log.debug("ledger does not accept an on_commit callback")
