"""What every front end's middlewares and handlers share per app (``Edge``) and per
request (``RequestContext``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from kvgate.gateway.config import HttpSettings, MetricsSettings
from kvgate.gateway.edge.metrics import RequestMetrics
from kvgate.gateway.ledger import Principal
from kvgate.gateway.protocol.errors import ApiError

if TYPE_CHECKING:
    from kvgate.gateway.ledger import Ledger


def _untranslated(request: web.Request, exc: Exception) -> ApiError | None:
    return None


def _never(request: web.Request) -> bool:
    return False


@dataclass
class Edge:
    """A front end as its middlewares, body reader, streams and /metrics see it; the
    replica (``http.app``) and the router (``route.app``) each make one."""

    http: HttpSettings  # body limit, read and write timeouts, stream buffers (read live)
    metrics: RequestMetrics
    ledger_of: Callable[[], Ledger]  # keys are checked there (once the app has opened it)
    # /metrics: on a port of its own, and the key it asks for (read live)
    metrics_settings: MetricsSettings = field(default_factory=MetricsSettings)
    # Requests that need no key besides the public paths (the console's pages).
    public: Callable[[web.Request], bool] = _never
    # A front end's own exceptions as the API errors the client sees (None: a 500).
    translate: Callable[[web.Request, Exception], ApiError | None] = _untranslated

    @property
    def ledger(self) -> Ledger:
        return self.ledger_of()


EDGE = web.AppKey("kvgate_edge", Edge)


def edge_of(request: web.Request) -> Edge:
    return request.app[EDGE]


@dataclass
class RequestContext:
    """Per-request facts the middlewares and handlers share."""

    request_id: str  # ours: the engine and ledger key
    public_id: str  # what x-request-id says (the client's, when it sent a sane one)
    t0: float
    engine_s: float = 0.0
    ledger_s: float | None = None  # the usage commit, when it happened before the headers
    principal: Principal | None = None
    receipt_id: str | None = None  # a billed generation's receipt (kvgate-receipt-id)
    # Why the client is gone, when it is: "hangup" (it closed the connection) or
    # "write_timeout" (it accepted no bytes for --write-timeout); counted 499 / 408.
    gone: str | None = None
    completion_tokens: int | None = None  # what a generation produced, once billed


CTX = web.RequestKey("kvgate_ctx", RequestContext)


def ctx_of(request: web.Request) -> RequestContext:
    return request[CTX]


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller (the auth middleware ran before any handler that asks)."""
    principal = request[CTX].principal
    if principal is None:
        raise RuntimeError("no principal: this route is not behind the auth middleware")
    return principal
