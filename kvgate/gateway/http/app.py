"""The aiohttp application: route table, middlewares, and the engine/ledger lifecycle."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from kvgate.cachestore.disk_tier import DiskTierConfig
from kvgate.cachestore.shared_tier import SharedTierConfig
from kvgate.gateway.config import Settings
from kvgate.gateway.engine import EngineConfig
from kvgate.gateway.engine.request import EngineMisconfigured
from kvgate.gateway.http import (
    admin,
    anthropic_api,
    caches_api,
    completions_api,
    console,
    models_api,
    openai_api,
    receipts_api,
    responses_api,
    tokenize_api,
)
from kvgate.gateway.http.errors import ApiError, error_response
from kvgate.gateway.http.limits import Limiter
from kvgate.gateway.http.metrics import Metrics
from kvgate.gateway.http.middleware import auth_middleware, context_middleware, on_response_prepare
from kvgate.gateway.http.openapi import spec
from kvgate.gateway.http.reservations import CacheStorageBiller, ReservationBiller
from kvgate.gateway.http.state import STATE, AppState, state_of
from kvgate.gateway.http.tools import parser_for
from kvgate.gateway.http.transport import handler_args
from kvgate.gateway.ledger import Ledger, LedgerUnavailable, migrates_on_start
from kvgate.gateway.ledger.checkpoints import Checkpoints
from kvgate.gateway.ledger.spool import default_spool_dir
from kvgate.gateway.route import replica

if TYPE_CHECKING:  # the engine (torch, transformers) is imported when an app builds one
    from kvgate.gateway.engine import Engine

log = logging.getLogger("kvgate.http")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while this replica admits requests (``Ledger.refusing``): a ledger database
    that is away while the usage spool takes its events keeps it ready. Reports the
    database's state and the spool's depth either way."""
    state: AppState = state_of(request)
    health = await state.ledger.health()
    if health.refusing is not None:
        raise ApiError(503, f"not admitting requests: {health.refusing} (database "
                       f"{health.database}, {health.spool_events} usage events spooled)",
                       code="not_ready", retry_after=5.0)
    return web.json_response({"status": "ready", "model": models_api.served_names(state)[0],
                              "ledger": {"database": health.database,
                                         "spool_events": health.spool_events}})


async def metrics(request: web.Request) -> web.Response:
    """/metrics on the API port: absent when a metrics port is set (served only there)."""
    state = state_of(request)
    if state.settings.metrics_port is not None:
        raise web.HTTPNotFound()
    return await _metrics(request, state, own_port=False)


async def _metrics(request: web.Request, state: AppState, own_port: bool) -> web.Response:
    """The scrape, for the operator only: it names tenants (by id) and what they spend.
    With ``metrics_key`` set, that key (or the admin key) is required; without it the
    metrics port is open (its network reach is the control) and the API port asks for the
    admin key."""
    try:
        allowed = await _may_read_metrics(request, state, own_port)
    except LedgerUnavailable:  # an admin key not looked up lately, with the database away
        return error_response(request.path, ApiError(
            503, "The key cannot be checked now: the ledger database is unavailable; the "
            "metrics key (KVGATE_METRICS_KEY) works without it.", code="ledger_unavailable",
            retry_after=5.0))
    if not allowed:
        err = ApiError(401, "/metrics needs 'Authorization: Bearer <key>' with the metrics "
                       "key (KVGATE_METRICS_KEY) or the admin key.", code="metrics_key_required")
        response = error_response(request.path, err)
        response.headers["WWW-Authenticate"] = 'Bearer realm="kvgate metrics"'
        return response
    return web.Response(body=state.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _may_read_metrics(request: web.Request, state: AppState, own_port: bool) -> bool:
    settings = state.settings
    auth = request.headers.get("Authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not (key.isascii() and key.isprintable()):
        return False  # no key we issued (undecodable header bytes arrive as surrogates)
    if settings.metrics_key and key and hmac.compare_digest(key.encode(),
                                                           settings.metrics_key.encode()):
        return True
    if not settings.metrics_key and own_port:
        return True  # the metrics port with no key: open to whoever can reach it
    if not key:
        return False
    principal = await state.ledger.authenticate(key)
    return principal is not None and principal.role == "admin"


async def _metrics_listener(state: AppState) -> web.AppRunner:
    """``--metrics-port``: /metrics alone on its own listener, for the scraper."""
    app = web.Application()

    async def scrape(request: web.Request) -> web.Response:
        return await _metrics(request, state, own_port=True)

    app.add_routes([web.get("/metrics", scrape, allow_head=False)])
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, state.settings.host, state.settings.metrics_port).start()
    except BaseException:
        await runner.cleanup()
        raise
    state.metrics.listen_port = runner.addresses[0][1]
    return runner


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


def _routes() -> list[web.RouteDef]:
    return [
        web.get("/healthz", healthz, allow_head=False),
        web.get("/health", healthz, allow_head=False),  # vLLM's name for it
        web.get("/readyz", readyz, allow_head=False),
        web.get("/metrics", metrics, allow_head=False),
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
    checkpoints = Checkpoints(settings.spool_dir or default_spool_dir(settings.db),
                              settings.checkpoint_interval_s, settings.checkpoint_tokens)
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
        model=settings.model, device=settings.device, dtype=settings.dtype,
        device_cache_bytes=settings.device_cache_bytes,
        host_cache_bytes=settings.host_cache_bytes, block_size=settings.block_size,
        kv_dtype=settings.kv_dtype, offload_kv_dtype=settings.offload_kv_dtype,
        max_batch_tokens=settings.max_batch_tokens, max_running=settings.max_running,
        max_queue=settings.max_queue,
        single_flight_wait_steps=settings.single_flight_wait_steps,
        fair_scheduling=settings.fair_scheduling, max_unread_tokens=settings.max_unread_tokens,
        contended_batch_tokens=settings.contended_batch_tokens,
        default_cache_ttl_seconds=float(settings.default_cache_ttl_seconds),
        max_model_len=settings.max_model_len, cache_shares=settings.cache_shares,
        shared_tier=shared_tier_config(settings), disk_tier=disk_tier_config(settings))


def disk_tier_config(settings: Settings) -> DiskTierConfig | None:
    if not settings.disk_cache_dir:
        return None
    for name in ("disk_cache_bytes", "disk_cache_write_bandwidth_bytes",
                 "disk_cache_read_bandwidth_bytes"):
        if getattr(settings, name) <= 0:
            raise EngineMisconfigured(f"--{name.replace('_', '-')} must be positive with "
                                      "--disk-cache-dir (leave --disk-cache-dir unset for no "
                                      "disk tier)")
    return DiskTierConfig(
        path=settings.disk_cache_dir, capacity_bytes=settings.disk_cache_bytes,
        write_bytes_per_s=settings.disk_cache_write_bandwidth_bytes,
        read_bytes_per_s=settings.disk_cache_read_bandwidth_bytes)


def shared_tier_config(settings: Settings) -> SharedTierConfig | None:
    if not settings.shared_tier_url:
        return None
    if not settings.shared_tier_secret:
        log.warning("the shared tier's entries are not signed: set KVGATE_SHARED_TIER_SECRET "
                    "(the same value on every replica) unless only kvgate can write to it")
    return SharedTierConfig(
        url=settings.shared_tier_url, timeout_ms=settings.shared_tier_timeout_ms,
        queue_bytes=settings.shared_tier_queue_bytes,
        bandwidth_bytes=settings.shared_tier_bandwidth_bytes,
        compute_flops=float(settings.shared_tier_compute_flops),
        secret=settings.shared_tier_secret or "")


def create_app(settings: Settings, engine: Engine | None = None,
               ledger: Ledger | None = None) -> web.Application:
    """Engine and ledger passed in are used as they are and left open at shutdown (the
    caller owns them); those the app creates itself it also closes."""
    parser_for(None, settings.tool_call_parser)  # an unknown --tool-call-parser fails here
    state = AppState(settings=settings, metrics=Metrics(settings.metrics_tenant_labels),
                     limiter=Limiter(settings.max_queue + settings.max_running))
    app = web.Application(middlewares=[context_middleware, auth_middleware],
                          client_max_size=settings.max_body_bytes,
                          handler_args=handler_args(settings))
    app[STATE] = state
    # an unreadable key file fails here, before the model loads (serve: one line, exit 2)
    state.receipt_key = receipts_api.load_key(settings)
    app.add_routes(_routes())
    responses_api.setup(app)
    app.on_response_prepare.append(on_response_prepare)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # The model first: a start that cannot serve (a model or KV pool it refuses) must not
        # create the ledger, whose first start makes an admin key it prints only once.
        the_engine = engine
        own_engine: Engine | None = None
        if the_engine is None:
            from kvgate.gateway.engine import Engine

            own_engine = the_engine = Engine(engine_config(settings))
        try:
            own_ledger = ledger or await Ledger.open(
                settings.db, migrate=migrates_on_start(settings.db),
                spool_dir=settings.spool_dir or default_spool_dir(settings.db),
                spool_max_events=settings.spool_max_events)
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
                state.admin_key_created = await own_ledger.bootstrap_admin(settings.admin_key)
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
            if ledger is None or settings.spool_dir:  # after the receipt key: rows get theirs
                checkpoints = await _checkpoints(settings, own_ledger)
                state.checkpoints = checkpoints
            state.metrics.watch(state.engine, own_ledger)
            if settings.metrics_port is not None:
                metrics_runner = await _metrics_listener(state)
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
