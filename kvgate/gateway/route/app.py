"""``kvgate route``: the stateless routing tier in front of several ``kvgate serve`` replicas.

It authenticates keys against the shared ledger with the replicas' own middleware and key
cache, computes each prompt's block hashes in the tenant's namespace (``prompt``), picks a
replica (``choose``) from the exact view of every replica's cache (``index``, kept by the
cache events the replicas publish, ``events``) and their load (``pool``), and passes the
request through (``proxy``). It bills nothing: the replica that answers bills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Gauge

from kvgate.gateway.http.app import metrics as metrics_endpoint
from kvgate.gateway.http.errors import ApiError, ClientGone
from kvgate.gateway.http.limits import Limiter
from kvgate.gateway.http.metrics import Metrics
from kvgate.gateway.http.middleware import auth_middleware, context_middleware, new_request_id
from kvgate.gateway.http.state import CTX, STATE, AppState, principal_of, state_of
from kvgate.gateway.http.tenancy import tenant_namespace
from kvgate.gateway.http.transport import handler_args
from kvgate.gateway.http.validation import read_body
from kvgate.gateway.ledger import Ledger
from kvgate.gateway.route.choose import Candidate, QueueCost, choose
from kvgate.gateway.route.events import EventBatch, EventFollower
from kvgate.gateway.route.index import ClusterIndex
from kvgate.gateway.route.pool import Replica, ReplicaPool
from kvgate.gateway.route.prompt import PromptRenderer, cache_key_of, tokenizer_for
from kvgate.gateway.route.proxy import attempt_of, forward
from kvgate.gateway.route.settings import RouterSettings

log = logging.getLogger("kvgate.route")

_SNAPSHOT_TIMEOUT_S = 10.0
_INLINE_RENDER_BYTES = 32 * 1024  # bodies up to this are rendered on the event loop


@dataclass
class RouterMetrics:
    routed: Counter
    resyncs: Counter
    healthy: Gauge

    @classmethod
    def on(cls, metrics: Metrics) -> RouterMetrics:
        r = metrics.registry
        return cls(
            Counter("kvgate_router_requests", "Requests routed, by replica and by whether "
                    "a cached prefix decided it", ["replica", "decision"], registry=r),
            Counter("kvgate_router_resyncs", "Replica cache views rebuilt from a snapshot",
                    registry=r),
            Gauge("kvgate_router_replicas_healthy", "Replicas in the pool", registry=r))


@dataclass
class Router:
    settings: RouterSettings
    renderer: PromptRenderer
    metrics: RouterMetrics
    index: ClusterIndex = field(default_factory=ClusterIndex)
    pool: ReplicaPool | None = None
    session: aiohttp.ClientSession | None = None
    follower: EventFollower | None = None
    queue_cost: QueueCost = field(default_factory=QueueCost)
    _syncing: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def plan(self, tenant_id: int, path: str, raw: bytes) -> tuple[list[Replica], bool]:
        """Replicas to try, in order, and whether a cached prefix chose the first."""
        assert self.pool is not None
        healthy = self.pool.healthy()
        if not healthy:
            return [], False
        model_id, block_size = healthy[0].model_id, healthy[0].block_size
        hashes: list[bytes] = []
        if self.follower is not None and block_size:
            if len(raw) > _INLINE_RENDER_BYTES:  # a long prompt: off the event loop
                hashes = await asyncio.to_thread(self.renderer.hashes, path, raw, tenant_id,
                                                 model_id, block_size)
            else:
                hashes = self.renderer.hashes(path, raw, tenant_id, model_id, block_size)
        candidates = [Candidate(r.url, r.load,
                                self.index.cached_blocks(r.replica_id, hashes, expected=True),
                                r.free_pages) for r in healthy]
        key = hashes[0] if hashes else tenant_namespace(tenant_id).encode()
        client_key = cache_key_of(raw)
        keyed = client_key is not None and not any(c.cached_blocks for c in candidates)
        if client_key is not None and keyed:  # the client's key, within its tenant
            key = b"key\0" + tenant_namespace(tenant_id).encode() + b"\0" + client_key.encode()
        order = choose(candidates, key, len(hashes), self.queue_cost.value, keyed=keyed)
        first = self.pool.replicas[order[0].name]
        if hashes:
            self.queue_cost.observe(len(hashes) - order[0].cached_blocks)
            self.index.expect(first.replica_id, hashes)
        return [self.pool.replicas[c.name] for c in order], order[0].cached_blocks > 0

    async def on_batch(self, batch: EventBatch) -> None:
        if not self.index.apply(batch) and self.pool is not None:
            replica = self.pool.by_id(batch.replica)
            if replica is not None:
                self.start_resync(replica)

    async def on_new_epoch(self, replica: Replica) -> None:
        """A replica seen for the first time or restarted: its view starts from a snapshot."""
        if self.follower is not None:
            self.start_resync(replica)

    def start_resync(self, replica: Replica) -> None:
        if replica.replica_id in self._syncing:
            return
        task = self._syncing[replica.replica_id] = asyncio.create_task(self._resync(replica))
        task.add_done_callback(lambda _: self._syncing.pop(replica.replica_id, None))

    async def _resync(self, replica: Replica) -> None:
        assert self.session is not None
        for _ in range(5):
            try:
                async with self.session.get(
                        replica.url + "/admin/cache/snapshot",
                        headers={"Authorization": f"Bearer {self.settings.admin_key}"},
                        timeout=aiohttp.ClientTimeout(total=_SNAPSHOT_TIMEOUT_S)) as resp:
                    resp.raise_for_status()
                    snap = await resp.json()
                blocks = [(bytes.fromhex(h), "device" if t == "d" else "host")
                          for _ns, h, t in snap["blocks"]]
                done = self.index.load(str(snap["replica_id"]), str(snap["epoch"]),
                                       int(snap["seq"]), blocks)  # type: ignore[arg-type]
                self.metrics.resyncs.inc()
                log.info("replica %s: cache view loaded from its snapshot (%d blocks, "
                         "event %d)", replica.url, len(blocks), snap["seq"])
                if done:
                    return
            except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
                log.warning("replica %s: snapshot failed: %r", replica.url, exc)
                await asyncio.sleep(0.5)


ROUTER = web.AppKey("kvgate_router", Router)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    assert router.pool is not None
    healthy = [r.url for r in router.pool.healthy()]
    if not healthy:
        raise ApiError(503, "No replica is in the pool.", code="not_ready", retry_after=1.0)
    return web.json_response({"status": "ready", "replicas": healthy,
                              "events": router.follower is not None and
                              router.follower.connected})


async def route(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    assert router.pool is not None and router.session is not None
    raw = await read_body(request)  # the replicas' own limits: size (413) and time (408)
    principal = principal_of(request)
    replicas: list[Replica] = []
    hit = False
    if principal.tenant_id is not None:
        replicas, hit = await router.plan(principal.tenant_id, request.path, raw)
    if not replicas:
        raise ApiError(503, "No replica is available now; retry shortly.",
                       code="no_replica_available", retry_after=1.0)
    router.metrics.routed.labels(replicas[0].url, "prefix" if hit else "affinity").inc()
    return await until_client_gone(request, forward(
        request, router.session, replicas, attempt_of(request, raw), router.pool.mark_down,
        router.settings.upstream_idle_timeout_s))


_CLIENT_POLL_S = 0.05


async def until_client_gone(request: web.Request,
                            work: Coroutine[Any, Any, web.StreamResponse]) -> web.StreamResponse:
    """Run ``work`` (the forwarding); a client that hangs up cancels it, which closes the
    connection to the replica, so the replica stops generating and bills what it did
    once, as it does for a client of its own. (aiohttp does not cancel handlers when a
    client goes, and an answer not yet started writes nothing that would notice.) A timer
    looks at the client's connection, not a task: it costs next to nothing per request."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle, gone
        transport = request.transport
        if transport is None or transport.is_closing():
            gone = True
            task.cancel()
            return
        handle = loop.call_later(_CLIENT_POLL_S, check)

    handle = loop.call_later(_CLIENT_POLL_S, check)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone() from None
        raise
    finally:
        if handle is not None:
            handle.cancel()


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Answers of the router's own (errors, health) carry a request id too."""
    if "x-request-id" not in response.headers:
        ctx = request.get(CTX)
        response.headers["x-request-id"] = ctx.public_id if ctx else new_request_id()


async def admin_elsewhere(request: web.Request) -> web.Response:
    """The router keeps no admin state (tenants, keys and usage live in the ledger, caches
    in the replicas): an admin call, once its key is checked, is told where to go."""
    raise ApiError(404, "kvgate route does not serve admin routes: send /admin/... (and "
                   "the console, /admin/ui) to a replica; a cache flush to each replica.",
                   code="admin_on_replicas")


def create_router_app(settings: RouterSettings, ledger: Ledger | None = None) -> web.Application:
    server = settings.server_settings()
    state = AppState(settings=server, metrics=Metrics(server.metrics_tenant_labels),
                     limiter=Limiter(1))
    app = web.Application(middlewares=[context_middleware, auth_middleware],
                          client_max_size=server.max_body_bytes,
                          handler_args=handler_args(server))
    app[STATE] = state
    router = Router(settings, PromptRenderer(tokenizer_for(settings.model)),
                    RouterMetrics.on(state.metrics))
    app[ROUTER] = router
    app.add_routes([
        web.get("/healthz", healthz, allow_head=False),
        web.get("/health", healthz, allow_head=False),
        web.get("/readyz", readyz, allow_head=False),
        web.get("/metrics", metrics_endpoint, allow_head=False),
        web.post("/tokenize", route), web.post("/detokenize", route),
        web.route("*", "/v1/{tail:.*}", route),
        web.route("*", "/admin/{tail:.*}", admin_elsewhere),
    ])
    app.on_response_prepare.append(on_response_prepare)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own = ledger or await Ledger.open(server.db, migrate=False)
        state.open_ledger(own)
        session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_connect=2.0),
            connector=aiohttp.TCPConnector(limit=0))
        router.session = session
        pool = router.pool = ReplicaPool(settings.replicas, settings.admin_key or "", session,
                                         router.on_new_epoch, settings.replicas_dns or None)
        tasks: list[asyncio.Task[None]] = []
        if settings.events_url:
            router.follower = EventFollower(settings.events_url, router.on_batch)
            with contextlib.suppress(Exception):
                await router.follower.start_position()  # before any snapshot is taken
            tasks.append(asyncio.create_task(router.follower.run(), name="kvgate-events"))

        async def gauge() -> None:
            while True:
                router.metrics.healthy.set(len(pool.healthy()))
                await asyncio.sleep(1.0)

        tasks += [asyncio.create_task(pool.run(), name="kvgate-pool"),
                  asyncio.create_task(gauge(), name="kvgate-pool-gauge")]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=2.0)  # a Redis call may be slow to give up
            await pool.close()
            if router.follower is not None:
                await router.follower.close()
            await session.close()
            if ledger is None:
                await own.close()

    app.cleanup_ctx.append(resources)
    return app


def router_of(request: web.Request) -> Router:
    return request.app[ROUTER]


__all__ = ["ROUTER", "Router", "create_router_app", "router_of", "state_of"]
