"""What handlers reach: the app-wide ``AppState`` and the per-request ``RequestContext``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from kvgate.gateway.config import Settings
from kvgate.gateway.http.limits import Limiter
from kvgate.gateway.http.metrics import Metrics
from kvgate.gateway.http.quotas import QuotaSync
from kvgate.gateway.ledger import Ledger
from kvgate.gateway.ledger.budgets import Budgets
from kvgate.gateway.ledger.checkpoints import Checkpoints
from kvgate.gateway.ledger.receipts import ReceiptKey
from kvgate.gateway.protocol.tool_parsers import ToolParser, parser_for

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from kvgate.gateway.engine import EngineApi


class NotOpen(RuntimeError):
    """The engine or ledger was used before the app opened it (or after it closed it)."""


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    limiter: Limiter
    started: float = field(default_factory=time.time)
    admin_key_created: str | None = None
    receipt_key: ReceiptKey | None = None  # signs billing receipts (http/receipts.py)
    # Explicit caches pinned on this replica: cache id -> namespace (http/caches)
    explicit_caches: dict[str, str] = field(default_factory=dict)
    # Running requests' usage so far, journalled against a crash (ledger/checkpoints.py)
    checkpoints: Checkpoints | None = None
    # How tool calls are read from the output (--tool-call-parser, else what the chat
    # template implies; None: they are not), known once the engine is open
    tool_parser: ToolParser | None = None
    _engine: EngineApi | None = None
    _ledger: Ledger | None = None
    _quotas: QuotaSync | None = None
    _budgets: Budgets | None = None

    def open(self, engine: EngineApi, ledger: Ledger) -> None:
        self._engine, self._ledger = engine, ledger
        self.tool_parser = parser_for(engine.tokenizer.chat_template,
                                      self.settings.engine.tool_call_parser)
        self._quotas = QuotaSync(engine.set_quota, engine.set_reservation)
        # the gateway's capacity counts what waits for or runs in the engine (limits.py)
        self.limiter.occupancy = lambda: engine.queue_depth() + engine.num_running()

    @property
    def engine(self) -> EngineApi:
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


STATE = web.AppKey("kvgate_state", AppState)


def state_of(request: web.Request) -> AppState:
    return request.app[STATE]


