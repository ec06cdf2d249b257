"""The aiohttp application: route table, middlewares, and the engine/ledger lifecycle."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from kvgate.cachestore.disk_tier import DiskTierConfig
from kvgate.cachestore.remote_tier import RemoteTierConfig
from kvgate.gateway.config import Settings
from kvgate.gateway.edge.context import EDGE, Edge
from kvgate.gateway.edge.middleware import auth_middleware, context_middleware, on_response_prepare
from kvgate.gateway.edge.scrape import metrics_endpoint, metrics_listener
from kvgate.gateway.edge.security import console_headers
from kvgate.gateway.edge.transport import handler_args
from kvgate.gateway.engine import EngineConfig, PromptTooLong
from kvgate.gateway.engine.request import EngineMisconfigured, EngineUnavailable
from kvgate.gateway.http import cluster as replica
from kvgate.gateway.http import console
from kvgate.gateway.http import receipts as receipts_api
from kvgate.gateway.http.admin import api as admin
from kvgate.gateway.http.anthropic import messages as anthropic_api
from kvgate.gateway.http.caches import api as caches_api
from kvgate.gateway.http.generation import engine_unavailable
from kvgate.gateway.http.limits import Limiter
from kvgate.gateway.http.metrics import Metrics
from kvgate.gateway.http.openai import (
    chat as openai_api,
)
from kvgate.gateway.http.openai import (
    completions as completions_api,
)
from kvgate.gateway.http.openai import (
    models as models_api,
)
from kvgate.gateway.http.openai import (
    tokenize as tokenize_api,
)
from kvgate.gateway.http.openapi import spec
from kvgate.gateway.http.reservations import CacheStorageBiller, ReservationBiller
from kvgate.gateway.http.responses import api as responses_api
from kvgate.gateway.http.state import STATE, AppState, state_of
from kvgate.gateway.ledger import Ledger, LedgerUnavailable, migrates_on_start
from kvgate.gateway.ledger.checkpoints import Checkpoints
from kvgate.gateway.ledger.spool import default_spool_dir
from kvgate.gateway.protocol.errors import ApiError, prompt_param
from kvgate.gateway.protocol.tool_parsers import parser_for

if TYPE_CHECKING:  # the engine (torch, transformers) is imported when an app builds one
    from kvgate.gateway.engine import EngineApi

log = logging.getLogger("kvgate.http")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while this replica admits requests (``Ledger.refusing``): a ledger database
    that is away while the usage spool takes its events keeps it ready. Reports the
    database's state and the spool's depth either way."""
    state: AppState = state_of(request)
    if not state.engine.up:
        raise ApiError(503, "not admitting requests: the engine core process is restarting",
                       code="not_ready", retry_after=2.0)
    health = await state.ledger.health()
    if health.refusing is not None:
        raise ApiError(503, f"not admitting requests: {health.refusing} (database "
                       f"{health.database}, {health.spool_events} usage events spooled)",
                       code="not_ready", retry_after=5.0)
    return web.json_response({"status": "ready", "model": models_api.served_names(state)[0],
                              "ledger": {"database": health.database,
                                         "spool_events": health.spool_events}})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


def _engine_errors(request: web.Request, exc: Exception) -> ApiError | None:
    """The engine's refusals the client must see as its own 400s."""
    if isinstance(exc, PromptTooLong):  # refused before tokenizing: it cannot fit the context
        return ApiError(400, f"The prompt is too long for this model's context: {exc}.",
                        code="context_length_exceeded", param=prompt_param(request.path))
    if isinstance(exc, EngineUnavailable):  # the engine core process is being restarted
        return engine_unavailable(exc)
    return None


def _routes() -> list[web.RouteDef]:
    return [
        web.get("/healthz", healthz, allow_head=False),
        web.get("/health", healthz, allow_head=False),  # vLLM's name for it
        web.get("/readyz", readyz, allow_head=False),
        web.get("/metrics", metrics_endpoint, allow_head=False),
        web.get("/openapi.json", openapi, allow_head=False),
        web.get("/v1/models", models_api.list_models, allow_head=False),
        # a model id may hold slashes (org/name), as the OpenAI SDK sends it
        web.get("/v1/models/{model:.+}", models_api.retrieve_model, allow_head=False),
        web.post("/tokenize", tokenize_api.tokenize),
        web.post("/detokenize", tokenize_api.detokenize),
        web.post("/v1/chat/completions", openai_api.chat_completions),
        web.post("/v1/completions", completions_api.completions),
        web.post("/v1/messages", anthropic_api.messages),
        web.post("/v1/messages/count_tokens", anthropic_api.count_tokens),
        *responses_api.routes(),
        *receipts_api.routes(),
        *caches_api.routes(),
        *admin.routes(),
        *console.routes(),
    ]


async def _checkpoints(settings: Settings, ledger: Ledger) -> Checkpoints:
    """The usage journal of running requests; first bills, as ``interrupted``, what the
    journals of stopped processes left unfinished (``ledger/checkpoints.py``)."""
    checkpoints = Checkpoints(settings.ledger.spool_dir or default_spool_dir(settings.ledger.db),
                              settings.ledger.checkpoint_interval_s, settings.ledger.checkpoint_tokens)
    recovered = await checkpoints.recover()
    failed = 0
    for event in recovered:
        try:
            await ledger.record(event)
        except Exception:
            failed += 1
            log.exception("could not bill interrupted request %s; it is retried at the "
                          "next start", event.request_id)
    if not failed:
        checkpoints.forget_recovered()
    return checkpoints


def engine_config(settings: Settings) -> EngineConfig:
    """The server's settings the engine acts on (the engine never reads ``Settings``)."""
    return EngineConfig(
        model=settings.engine.model, device=settings.engine.device, dtype=settings.engine.dtype,
        device_cache_bytes=settings.cache.device_cache_bytes,
        host_cache_bytes=settings.cache.host_cache_bytes, block_size=settings.cache.block_size,
        kv_dtype=settings.cache.kv_dtype, offload_kv_dtype=settings.cache.offload_kv_dtype,
        max_batch_tokens=settings.engine.max_batch_tokens, max_running=settings.engine.max_running,
        max_queue=settings.engine.max_queue,
        single_flight_wait_steps=settings.engine.single_flight_wait_steps,
        fair_scheduling=settings.engine.fair_scheduling, max_unread_tokens=settings.engine.max_unread_tokens,
        contended_batch_tokens=settings.engine.contended_batch_tokens,
        default_cache_ttl_seconds=float(settings.cache.default_cache_ttl_seconds),
        max_model_len=settings.engine.max_model_len, cache_shares=settings.cache.cache_shares,
        remote_tier=remote_tier_config(settings), disk_tier=disk_tier_config(settings))


def disk_tier_config(settings: Settings) -> DiskTierConfig | None:
    if not settings.disk_tier.disk_cache_dir:
        return None
    for name in ("disk_cache_bytes", "disk_cache_write_bandwidth_bytes",
                 "disk_cache_read_bandwidth_bytes"):
        if getattr(settings.disk_tier, name) <= 0:
            raise EngineMisconfigured(f"--{name.replace('_', '-')} must be positive with "
                                      "--disk-cache-dir (leave --disk-cache-dir unset for no "
                                      "disk tier)")
    return DiskTierConfig(
        path=settings.disk_tier.disk_cache_dir, capacity_bytes=settings.disk_tier.disk_cache_bytes,
        write_bytes_per_s=settings.disk_tier.disk_cache_write_bandwidth_bytes,
        read_bytes_per_s=settings.disk_tier.disk_cache_read_bandwidth_bytes)


def remote_tier_config(settings: Settings) -> RemoteTierConfig | None:
    if not settings.remote_tier.shared_tier_url:
        return None
    if not settings.remote_tier.shared_tier_secret:
        log.warning("the shared tier's entries are not signed: set KVGATE_SHARED_TIER_SECRET "
                    "(the same value on every replica) unless only kvgate can write to it")
    return RemoteTierConfig(
        url=settings.remote_tier.shared_tier_url, timeout_ms=settings.remote_tier.shared_tier_timeout_ms,
        queue_bytes=settings.remote_tier.shared_tier_queue_bytes,
        bandwidth_bytes=settings.remote_tier.shared_tier_bandwidth_bytes,
        compute_flops=float(settings.remote_tier.shared_tier_compute_flops),
        secret=settings.remote_tier.shared_tier_secret or "")


def api_servers(settings: Settings) -> int:
    """``--api-servers``, or what it means unset: the engine core in a process of its own
    when the machine has a core for each side."""
    if settings.http.api_servers is not None:
        return settings.http.api_servers
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if (usable or 1) >= 2 else 0


def create_app(settings: Settings, engine: EngineApi | None = None,
               ledger: Ledger | None = None) -> web.Application:
    """Engine and ledger passed in are used as they are and left open at shutdown (the
    caller owns them); those the app creates itself it also closes."""
    parser_for(None, settings.engine.tool_call_parser)  # an unknown --tool-call-parser fails here
    state = AppState(settings=settings, metrics=Metrics(settings.metrics.metrics_tenant_labels),
                     limiter=Limiter(settings.engine.max_queue + settings.engine.max_running))
    app = web.Application(middlewares=[context_middleware, auth_middleware],
                          client_max_size=settings.http.max_body_bytes,
                          handler_args=handler_args(settings.http.read_timeout_s))
    app[STATE] = state
    app[EDGE] = Edge(
        settings.http, state.metrics, lambda: state.ledger,
        metrics_settings=settings.metrics,
        public=console.is_console_request, translate=_engine_errors)
    # an unreadable key file fails here, before the model loads (serve: one line, exit 2)
    state.receipt_key = receipts_api.load_key(settings)
    app.add_routes(_routes())
    responses_api.setup(app)
    app.on_response_prepare.append(on_response_prepare)
    app.on_response_prepare.append(console_headers)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # The model first: a start that cannot serve (a model or KV pool it refuses) must not
        # create the ledger, whose first start makes an admin key it prints only once.
        the_engine = engine
        own_engine: EngineApi | None = None
        if the_engine is None and api_servers(settings) > 0:
            from kvgate.gateway.engine.client import EngineClient

            own_engine = the_engine = EngineClient(engine_config(settings))
            await own_engine.start()  # the core process loads the model
        elif the_engine is None:
            from kvgate.gateway.engine import Engine

            own_engine = the_engine = Engine(engine_config(settings))
        try:
            own_ledger = ledger or await Ledger.open(
                settings.ledger.db, migrate=migrates_on_start(settings.ledger.db),
                spool_dir=settings.ledger.spool_dir or default_spool_dir(settings.ledger.db),
                spool_max_events=settings.ledger.spool_max_events)
        except BaseException:
            if own_engine is not None:
                await own_engine.stop()  # not started: closes what it opened (shared tier)
            raise
        metrics_runner: web.AppRunner | None = None
        checkpoints: Checkpoints | None = None
        biller: ReservationBiller | None = None
        storage: CacheStorageBiller | None = None
        try:
            try:
                state.admin_key_created = await own_ledger.bootstrap_admin(settings.http.admin_key)
            except LedgerUnavailable as exc:  # started during an outage: the keys exist
                log.error("could not check the admin key (ledger unavailable): %s", exc)
            if own_engine is not None:
                await own_engine.start()
            state.open(the_engine, own_ledger)
            biller = ReservationBiller(state, models_api.served_names(state)[0])
            biller.start()
            storage = CacheStorageBiller(state)
            storage.start()
            own_ledger.on_commit = state.metrics.on_ledger_commit
            own_ledger.receipt_key = state.receipt_key
            if ledger is None or settings.ledger.spool_dir:  # after the receipt key: rows get theirs
                checkpoints = await _checkpoints(settings, own_ledger)
                state.checkpoints = checkpoints
            state.metrics.watch(state.engine, own_ledger)
            if settings.metrics.metrics_port is not None:
                metrics_runner = await metrics_listener(app[EDGE], settings.http.host)
            yield
        finally:
            if biller is not None:
                await biller.stop()
            if storage is not None:
                await storage.stop()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            if own_engine is not None:
                await own_engine.stop()
            if checkpoints is not None:
                await checkpoints.close()
            if ledger is None:
                await own_ledger.close()

    app.cleanup_ctx.append(resources)
    console.setup(app)  # after resources: it samples the engine they open
    replica.setup(app)  # /admin/load, /admin/cache/snapshot, cache events (kvgate route)
    return app
