"""What handlers reach: the app-wide ``AppState`` and the per-request ``RequestContext``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from kvgate.gateway.config import Settings
from kvgate.gateway.http.limits import Limiter
from kvgate.gateway.http.metrics import Metrics
from kvgate.gateway.http.tenancy import QuotaSync
from kvgate.gateway.ledger import Ledger, Principal
from kvgate.gateway.ledger.budgets import Budgets
from kvgate.gateway.ledger.checkpoints import Checkpoints
from kvgate.gateway.ledger.receipts import ReceiptKey

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from kvgate.gateway.engine.engine import Engine


class NotOpen(RuntimeError):
    """The engine or ledger was used before the app opened it (or after it closed it)."""


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    limiter: Limiter
    started: float = field(default_factory=time.time)
    admin_key_created: str | None = None
    receipt_key: ReceiptKey | None = None  # signs billing receipts (receipts_api)
    # Explicit caches pinned on this replica: cache id -> namespace (caches_api)
    explicit_caches: dict[str, str] = field(default_factory=dict)
    # Running requests' usage so far, journalled against a crash (ledger/checkpoints.py)
    checkpoints: Checkpoints | None = None
    _engine: Engine | None = None
    _ledger: Ledger | None = None
    _quotas: QuotaSync | None = None
    _budgets: Budgets | None = None

    def open(self, engine: Engine, ledger: Ledger) -> None:
        self._engine, self._ledger = engine, ledger
        self._quotas = QuotaSync(engine.set_quota, engine.set_reservation)
        # the gateway's capacity counts what waits for or runs in the engine (limits.py)
        self.limiter.occupancy = lambda: engine.queue_depth() + engine.num_running()

    def open_ledger(self, ledger: Ledger) -> None:
        """The ledger alone: ``kvgate route`` authenticates keys and runs no engine."""
        self._ledger = ledger

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise NotOpen("the engine is not open")
        return self._engine

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise NotOpen("the ledger is not open")
        return self._ledger

    @property
    def budgets(self) -> Budgets:
        """Spend budgets on this replica (``budgets.py``), made on first use."""
        if self._budgets is None:
            self._budgets = Budgets(self.ledger)
            self._budgets.observer = self.metrics.observe_budget
        return self._budgets

    @property
    def quotas(self) -> QuotaSync:
        if self._quotas is None:
            raise NotOpen("the engine is not open")
        return self._quotas


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


STATE = web.AppKey("kvgate_state", AppState)
CTX = web.RequestKey("kvgate_ctx", RequestContext)


def state_of(request: web.Request) -> AppState:
    return request.app[STATE]


def ctx_of(request: web.Request) -> RequestContext:
    return request[CTX]


def principal_of(request: web.Request) -> Principal:
    """The authenticated caller (the auth middleware ran before any handler that asks)."""
    principal = request[CTX].principal
    if principal is None:
        raise RuntimeError("no principal: this route is not behind the auth middleware")
    return principal
