"""``kvgate route``: the stateless routing tier in front of several ``kvgate serve`` replicas.

It authenticates keys against the shared ledger with the same edge middleware and key
cache as the replicas, computes each prompt's block hashes in the tenant's namespace (``prompt``), picks a
replica (``choose``) from the exact view of every replica's cache (``index``, kept by the
cache events the replicas publish, ``events``) and their load (``pool``), and passes the
request through (``proxy``). It bills nothing: the replica that answers bills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Gauge

from kvgate.cachestore.block import Tier
from kvgate.gateway.edge.body import off_loop, read_body
from kvgate.gateway.edge.context import CTX, EDGE, Edge, principal_of
from kvgate.gateway.edge.errors import ClientGone
from kvgate.gateway.edge.metrics import RequestMetrics
from kvgate.gateway.edge.middleware import auth_middleware, context_middleware, new_request_id
from kvgate.gateway.edge.scrape import metrics_endpoint, metrics_listener
from kvgate.gateway.edge.security import console_headers
from kvgate.gateway.edge.transport import handler_args
from kvgate.gateway.ledger import Ledger
from kvgate.gateway.protocol.errors import ApiError
from kvgate.gateway.protocol.namespace import tenant_namespace
from kvgate.gateway.protocol.wire import EventBatch, Rejected, key_for, parse_snapshot
from kvgate.gateway.route.choose import OPENS, Candidate, QueueCost, RecentShare, choose
from kvgate.gateway.route.events import EventFollower
from kvgate.gateway.route.index import ClusterIndex
from kvgate.gateway.route.pool import Replica, ReplicaPool, describe
from kvgate.gateway.route.prompt import (
    PromptRenderer,
    cache_key_in,
    conversation_turn,
    model_id_of,
    names_cache_key,
    parse_body,
    tokenizer_for,
)
from kvgate.gateway.route.proxy import ANSWER_ENDED, attempt_of, forward
from kvgate.gateway.route.settings import RouterSettings

log = logging.getLogger("kvgate.route")

_SNAPSHOT_TIMEOUT_S = 10.0
_CATCH_UP_S = 0.05  # reconciliation waits for the events before a snapshot this often ...
_CATCH_UP_TRIES = 40  # ... and this many times, the view frozen meanwhile
LAG_S = 5.0  # a view this long behind what its replica had made has lost events
_INLINE_RENDER_BYTES = 32 * 1024  # bodies up to this are rendered on the event loop


# Why a cache event entry was refused (kvgate_router_events_rejected_total{reason}):
REJECT_REASONS = (
    "unsigned",  # no MAC, and the router has a key
    "bad_signature",  # a MAC that does not verify (forged, altered, another secret)
    "malformed",  # not a batch at all
    "impossible_range",  # signed, but a range no publisher sends (too long, miscounted)
    "unknown_replica",  # names no replica in this router's pool
    "other_epoch",  # not the epoch the replica reports now (a replay of an older run)
)


@dataclass
class RouterMetrics:
    routed: Counter
    resyncs: Counter
    healthy: Gauge
    rejected: Counter
    view_ahead: Counter
    view_behind: Counter
    reconciles: Counter
    differences: Counter

    @classmethod
    def on(cls, metrics: RequestMetrics) -> RouterMetrics:
        r = metrics.registry
        m = cls(
            Counter("kvgate_router_requests", "Requests routed, by replica and by whether "
                    "a cached prefix decided it", ["replica", "decision"], registry=r),
            Counter("kvgate_router_resyncs", "Replica cache views rebuilt from a snapshot",
                    registry=r),
            Gauge("kvgate_router_replicas_healthy", "Replicas in the pool", registry=r),
            Counter("kvgate_router_events_rejected", "Cache event entries refused, by reason",
                    ["reason"], registry=r),
            Counter("kvgate_router_view_ahead", "Replica views found ahead of the replica's "
                    "own last event (fed events it never made); each is reconciled",
                    registry=r),
            Counter("kvgate_router_view_behind", "Replica views still behind events their "
                    "replica had made several seconds before (events lost); each is "
                    "reconciled", registry=r),
            Counter("kvgate_router_reconciles", "Replica views checked against a fresh "
                    "snapshot and replaced by it", registry=r),
            Counter("kvgate_router_reconcile_differences", "Blocks that differed between a "
                    "replica's view and its snapshot (missing, extra, or on another tier)",
                    registry=r))
        for reason in REJECT_REASONS:
            m.rejected.labels(reason)
        return m


@dataclass
class Plan:
    """Where a request goes (``Router.plan``), and what to settle once it is answered."""

    replicas: list[Replica]  # to try, in order
    hit: bool  # a cached prefix chose the first
    uncached: int | None = None  # the prompt's blocks the first lacks (None: not rendered)
    first: str = ""  # the replica its share was counted on ...
    number: int | None = None  # ... as this request (``RecentShare.sent``); None: not counted


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
    recent: RecentShare = field(default_factory=RecentShare)
    _syncing: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _behind: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (target, since)
    ledger: Ledger | None = None  # keys are checked there (the replicas' ledger)
    compared: int = 0  # views compared with a snapshot (tests read these)
    differences: int = 0  # blocks found different by those comparisons

    def the_ledger(self) -> Ledger:
        if self.ledger is None:
            raise RuntimeError("the router's ledger is not open")
        return self.ledger

    async def plan(self, tenant_id: int, path: str, raw: bytes, work: bool = True,
                   parts: list[tuple[str, float]] | None = None) -> Plan:
        """Replicas to try, in order, and whether a cached prefix chose the first.
        ``work``: the request runs the model (a POST), so it counts in the replica's share
        (``settle`` takes it back if the replica refuses it).
        ``parts``: gets the seconds spent rendering and hashing, and choosing."""
        assert self.pool is not None
        healthy = self.pool.healthy()
        if not healthy:
            return Plan([], False)
        model_id, block_size = healthy[0].model_id, healthy[0].block_size
        t0 = time.perf_counter()

        render = self.follower is not None and bool(block_size)

        def read() -> tuple[list[bytes], str | None, int]:  # the body parsed once, if at all
            keyed = names_cache_key(raw)
            body = parse_body(raw) if render or keyed else None
            hashes = (self.renderer.hashes_of(path, body, tenant_id, model_id, block_size)
                      if render else [])
            return (hashes, cache_key_in(body) if keyed else None,
                    conversation_turn(path, body))

        # a long body (parsing it alone can take a second) off the event loop, on the
        # bounded pool the replicas prepare big bodies on
        hashes, client_key, turn = (await off_loop(read) if len(raw) > _INLINE_RENDER_BYTES
                                    else read())
        t1 = time.perf_counter()
        candidates = [Candidate(r.url, r.load,
                                self.index.cached_blocks(r.replica_id, hashes, expected=True),
                                r.free_pages, r.queue_depth,
                                self.recent.load(r.url) if turn == OPENS
                                else self.recent.of(r.url), r.device_pages)
                      for r in healthy]
        key = hashes[0] if hashes else tenant_namespace(tenant_id).encode()
        keyed = client_key is not None and not any(c.cached_blocks for c in candidates)
        if client_key is not None and keyed:  # the client's key, within its tenant
            key = b"key\0" + tenant_namespace(tenant_id).encode() + b"\0" + client_key.encode()
        order = choose(candidates, key, len(hashes), self.queue_cost.value, keyed=keyed)
        first = self.pool.replicas[order[0].name]
        number = self.recent.sent(first.url, turn) if work else None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("route tenant=%d blocks=%d queue_cost=%.1f -> %s; %s", tenant_id,
                      len(hashes), self.queue_cost.value, first.url, " ".join(
                          f"{c.name}:cached={c.cached_blocks},waiting={c.waiting:g},"
                          f"recent={c.recent:.1f},free={c.free_pages}/{c.device_pages}"
                          for c in candidates))
        if hashes:
            self.index.expect(first.replica_id, hashes)
        if parts is not None:
            parts += [("render", t1 - t0), ("choose", time.perf_counter() - t1)]
        return Plan([self.pool.replicas[c.name] for c in order], order[0].cached_blocks > 0,
                    len(hashes) - order[0].cached_blocks if hashes else None,
                    first.url, number)

    def settle(self, plan: Plan, status: int) -> None:
        """The answer's status is known (``status``; 503 when no replica took it): an
        answered request's prefill feeds the queue cost; one refused (4xx) or taken by no
        replica ran nothing, and leaves the share of the replica it was counted on."""
        if 200 <= status < 300:
            if plan.uncached is not None:
                self.queue_cost.observe(plan.uncached)
        elif (400 <= status < 500 or status == 503) and plan.number is not None:
            self.recent.withdraw(plan.first, plan.number)

    async def on_batch(self, batch: EventBatch) -> None:
        """A checked batch (``protocol.wire.verify``): applied to its replica's view if it names a
        replica of the pool in its current epoch; a gap starts a resync."""
        if self.pool is None:
            return
        replica = self.pool.by_id(batch.replica)
        if replica is None:
            self.on_reject(Rejected("unknown_replica", batch.replica))
            return
        if replica.epoch and batch.epoch != replica.epoch:
            # an older run's batch (replayed), or a new run's before the poll saw it: the
            # new run's view starts from a snapshot taken after this batch anyway
            self.on_reject(Rejected("other_epoch", batch.replica))
            return
        if not self.index.apply(batch):
            self.start_resync(replica)

    def on_reject(self, exc: Rejected) -> None:
        self.metrics.rejected.labels(exc.reason).inc()
        if exc.reason == "impossible_range" and exc.replica and self.pool is not None:
            # signed with our key, yet no publisher sends it: what that replica's view
            # should hold is unknown, so it is rebuilt from the replica itself
            replica = self.pool.by_id(exc.replica)
            if replica is not None:
                self.start_resync(replica, compare=True)

    def on_polled(self, replica: Replica) -> None:
        """A view behind what its replica had made ``LAG_S`` ago has lost events that no
        later batch showed (the last batches lost, the stream unwritable): it is rebuilt
        from the replica's snapshot. (A view ahead is ``on_view_ahead``'s.)"""
        v = self.index.views.get(replica.replica_id)
        target = replica.event_seq
        if (self.follower is None or v is None or not v.synced or target is None
                or v.epoch != replica.epoch or v.seq >= target):
            self._behind.pop(replica.replica_id, None)
            return
        now = asyncio.get_running_loop().time()
        since = self._behind.get(replica.replica_id)
        if since is None or v.seq >= since[0]:  # caught up with the last target: a new one
            self._behind[replica.replica_id] = (target, now)
        elif now - since[1] >= LAG_S:
            self._behind.pop(replica.replica_id, None)
            self.metrics.view_behind.inc()
            log.warning("replica %s: this router's view is at event %d; the replica had made "
                        "%d more than %.0f s ago and they never arrived: reloading it from "
                        "the replica's snapshot", replica.url, v.seq, since[0], LAG_S)
            self.start_resync(replica, compare=True)

    def view_of(self, replica_id: str) -> tuple[str, int] | None:
        v = self.index.views.get(replica_id)
        return (v.epoch, v.seq) if v is not None and v.epoch else None

    def on_view_ahead(self, replica: Replica, view_seq: int) -> None:
        """The view claims more events than the replica has made: it was fed forged ones.
        It is compared with a fresh snapshot and replaced by it."""
        self.metrics.view_ahead.inc()
        log.warning("replica %s: this router's view is at event %d, past the replica's own "
                    "last event %s: it was fed events the replica never made; reloading it "
                    "from the replica's snapshot", replica.url, view_seq, replica.event_seq)
        self.start_resync(replica, compare=True)

    async def on_new_epoch(self, replica: Replica) -> None:
        """A replica seen for the first time or restarted: its view starts from a snapshot."""
        expected = model_id_of(self.settings.routing.model)
        if replica.model_id and replica.model_id != expected:
            log.warning("replica %s serves model %r but this router renders prompts for %r "
                        "(--model): its cached prefixes will never match; give the router "
                        "the replicas' --model", replica.url, replica.model_id, expected)
        if self.follower is not None:
            self.start_resync(replica)

    def start_resync(self, replica: Replica, compare: bool = False) -> asyncio.Task[None]:
        """Rebuild ``replica``'s view from its snapshot (one at a time per replica). With
        ``compare`` (reconciliation), the view is frozen first and the differences between
        it and the snapshot are counted. → the task doing it (or the one already doing it)."""
        running = self._syncing.get(replica.replica_id)
        if running is not None:
            return running
        compare = compare and self.index.freeze(replica.replica_id)
        task = self._syncing[replica.replica_id] = asyncio.create_task(
            self._resync(replica, compare))
        task.add_done_callback(lambda _: self._syncing.pop(replica.replica_id, None))
        return task

    async def reconcile(self, replica: Replica) -> None:
        """Compare ``replica``'s view with a fresh snapshot and replace it (once done)."""
        if self.follower is not None and replica.replica_id:
            await self.start_resync(replica, compare=True)

    async def reconcile_all(self) -> None:
        assert self.pool is not None
        for replica in self.pool.healthy():  # one after the other: one snapshot at a time
            v = self.index.views.get(replica.replica_id)
            if v is not None and v.synced:
                await self.reconcile(replica)

    async def _resync(self, replica: Replica, compare: bool = False) -> None:
        assert self.session is not None
        for _ in range(5):
            try:  # over the replica's admin-authenticated path: the truth, not the stream
                async with self.session.get(
                        replica.url + "/admin/cache/snapshot",
                        headers={"Authorization": f"Bearer {self.settings.http.admin_key}"},
                        timeout=aiohttp.ClientTimeout(total=_SNAPSHOT_TIMEOUT_S)) as resp:
                    resp.raise_for_status()
                    snap = parse_snapshot(await resp.json())
                if snap.replica_id != replica.replica_id:
                    log.warning("replica %s: its snapshot is of %r, not %r; not loaded",
                                replica.url, snap.replica_id, replica.replica_id)
                    return
                blocks, epoch, seq = snap.blocks, snap.epoch, snap.seq
                if compare:
                    await self._count_differences(replica, epoch, seq, blocks)
                    compare = False
                done = self.index.load(replica.replica_id, epoch, seq, blocks.items())
                self.metrics.resyncs.inc()
                log.info("replica %s: cache view loaded from its snapshot (%d blocks, "
                         "event %d)", replica.url, len(blocks), seq)
                if done:
                    return
            except (TimeoutError, aiohttp.ClientError, KeyError, ValueError, TypeError) as exc:
                log.warning("replica %s: snapshot failed: %s", replica.url, describe(exc))
                await asyncio.sleep(0.5)

    async def _count_differences(self, replica: Replica, epoch: str, seq: int,
                                 blocks: dict[bytes, Tier]) -> None:
        """Compare the frozen view with the snapshot once the events up to it have
        arrived (the replica publishes what it made a few milliseconds later)."""
        self.metrics.reconciles.inc()
        v = self.index.views.get(replica.replica_id)
        if v is None or v.epoch != epoch:
            return  # the replica restarted: a new view, nothing to compare it with
        for _ in range(_CATCH_UP_TRIES):
            found = self.index.compare(replica.replica_id, epoch, seq, blocks)
            if found is not None:
                break
            await asyncio.sleep(_CATCH_UP_S)
        else:  # another epoch, or events this router never had: nothing to compare
            log.info("replica %s: view not compared with its snapshot (event %d): the events "
                     "before it did not all arrive", replica.url, seq)
            return
        self.compared += 1
        self.differences += found
        self.metrics.differences.inc(found)
        if found:
            log.warning("replica %s: %d blocks of this router's view differed from the "
                        "replica's snapshot (event %d); the view is replaced by it",
                        replica.url, found, seq)

    async def reconcile_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile_all()
            except Exception:  # never the end of reconciliation
                log.exception("reconciling the replicas' views failed")


ROUTER = web.AppKey("kvgate_router", Router)
API_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages",
             "/v1/messages/count_tokens", "/v1/responses", "/v1/models")


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
    plan = Plan([], False)
    parts: list[tuple[str, float]] = []
    if principal.tenant_id is not None:
        plan = await router.plan(principal.tenant_id, request.path, raw,
                                 work=request.method == "POST", parts=parts)
    replicas = plan.replicas
    if not replicas:
        raise ApiError(503, "No replica is available now; retry shortly.",
                       code="no_replica_available", retry_after=1.0)
    router.metrics.routed.labels(replicas[0].url, "prefix" if plan.hit else "affinity").inc()
    settled = False

    def settle(status: int) -> None:  # once, before the answer's first byte leaves
        nonlocal settled
        if not settled:
            settled = True
            router.settle(plan, status)

    try:
        resp = await until_client_gone(request, forward(
            request, router.session, replicas, attempt_of(request, raw),
            router.pool.mark_down, router.settings.routing.upstream_idle_timeout_s, parts,
            settle))
    except ApiError as exc:
        settle(exc.status)
        raise
    settle(resp.status)
    return resp


_CLIENT_POLL_S = 0.05


async def until_client_gone(request: web.Request,
                            work: Coroutine[Any, Any, web.StreamResponse]) -> web.StreamResponse:
    """Run ``work`` (the forwarding); a client that hangs up cancels it, which closes the
    connection to the replica, so the replica stops generating and bills what it did
    once, as it does for a client of its own. (aiohttp does not cancel handlers when a
    client goes, and an answer not yet started writes nothing that would notice.) A timer
    looks at the client's connection, not a task: it costs next to nothing per request. A
    client that closes once a stream's last event has reached it did not hang up: the
    forwarding reads the replica's end of the answer and the request counts as answered."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle, gone
        transport = request.transport
        if transport is None or transport.is_closing():
            if request.get(ANSWER_ENDED):  # the client closed after the last event
                return
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
    """Raises ``EventsMisconfigured`` for cache events with neither a secret nor the
    opt-out (``--events-unsigned``)."""
    events_key = key_for(settings.events.events_url, settings.events.events_secret, None,
                         settings.events.events_unsigned, "kvgate route")
    metrics = RequestMetrics(settings.metrics.metrics_tenant_labels)
    app = web.Application(middlewares=[context_middleware, auth_middleware],
                          client_max_size=settings.http.max_body_bytes,
                          handler_args=handler_args(settings.http.read_timeout_s))
    router = Router(settings, PromptRenderer(tokenizer_for(settings.routing.model)),
                    RouterMetrics.on(metrics))
    app[ROUTER] = router
    app[EDGE] = edge = Edge(settings.http, metrics, router.the_ledger,
                            metrics_settings=settings.metrics)
    app.add_routes([
        web.get("/healthz", healthz, allow_head=False),
        web.get("/health", healthz, allow_head=False),
        web.get("/readyz", readyz, allow_head=False),
        web.get("/metrics", metrics_endpoint, allow_head=False),
        web.post("/tokenize", route), web.post("/detokenize", route),
        # the replicas' API paths by name (each its own ``endpoint`` label in the
        # metrics), then any other: the replica answers it, errors included
        *(web.route("*", path, route) for path in API_PATHS),
        web.route("*", "/v1/{tail:.*}", route),
        web.route("*", "/admin/{tail:.*}", admin_elsewhere),
    ])
    app.on_response_prepare.append(on_response_prepare)
    app.on_response_prepare.append(console_headers)  # the console's paths answer errors here

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # a database away at start is an outage like any other: the router serves, keys it
        # has not cached are refused with 503 until it answers (a crash loop helps nobody)
        own = ledger or await Ledger.open(settings.routing.db, migrate=False,
                                          unreachable_ok=True)
        router.ledger = own
        session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=2.0, sock_connect=2.0),
            connector=aiohttp.TCPConnector(limit=0))
        router.session = session
        pool = router.pool = ReplicaPool(settings.routing.replicas, settings.http.admin_key or "", session,
                                         router.on_new_epoch, settings.routing.replicas_dns or None,
                                         router.view_of, router.on_view_ahead,
                                         router.on_polled)
        tasks: list[asyncio.Task[None]] = []
        if settings.events.events_url:
            router.follower = EventFollower(settings.events.events_url, router.on_batch, events_key,
                                            router.on_reject)
            with contextlib.suppress(Exception):
                await router.follower.start_position()  # before any snapshot is taken
            tasks.append(asyncio.create_task(router.follower.run(), name="kvgate-events"))
            if settings.routing.reconcile_interval_s > 0:
                tasks.append(asyncio.create_task(
                    router.reconcile_every(settings.routing.reconcile_interval_s),
                    name="kvgate-reconcile"))

        async def gauge() -> None:
            while True:
                router.metrics.healthy.set(len(pool.healthy()))
                await asyncio.sleep(1.0)

        tasks += [asyncio.create_task(pool.run(), name="kvgate-pool"),
                  asyncio.create_task(gauge(), name="kvgate-pool-gauge")]
        metrics_runner = (await metrics_listener(edge, settings.http.host)
                          if settings.metrics.metrics_port is not None else None)
        try:
            yield
        finally:
            if metrics_runner is not None:
                await metrics_runner.cleanup()
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


__all__ = ["ROUTER", "Plan", "Router", "create_router_app", "router_of"]
