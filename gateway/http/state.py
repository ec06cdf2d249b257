"""What handlers reach: the app-wide ``AppState`` and the per-request ``RequestContext``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.config import Settings
from gateway.http.limits import Limiter
from gateway.http.metrics import Metrics

if TYPE_CHECKING:
    from gateway.http.generation import Generation, Usage


def tenant_namespace(tenant_id: Any) -> str:
    """Computed on the server from the authenticated key only; clients cannot name one."""
    return f"tenant:{tenant_id}"


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    limiter: Limiter
    engine: Any = None
    ledger: Any = None
    started: float = field(default_factory=time.time)
    admin_key_created: str | None = None
    _quotas: dict[str, int | None] = field(default_factory=dict)
    _plans: dict[Any, Any] = field(default_factory=dict)
    _plans_at: float = 0.0

    def apply_quota(self, principal: Any) -> None:
        """Push the tenant's quota to the cache when it changed (keys made by the CLI too)."""
        ns = tenant_namespace(principal.tenant_id)
        quota = principal.cache_quota_bytes
        if ns not in self._quotas or self._quotas[ns] != quota:
            self.engine.set_quota(ns, quota)
            self._quotas[ns] = quota

    def forget_quota(self, tenant_id: Any) -> None:
        self._quotas.pop(tenant_namespace(tenant_id), None)

    async def cost_of(self, event: Any, plan_id: Any) -> int | None:
        """The event's cost for the metrics, by the ledger's own rule and the tenant's plan
        (plans re-read at most every 30 s; the ledger row stays the billing truth)."""
        from gateway.ledger import Prices, cost_micros

        if time.monotonic() - self._plans_at > 30.0 or plan_id not in self._plans:
            try:
                self._plans = {p["id"]: Prices(**{k: p[k] for k in Prices.__dataclass_fields__})
                               for p in await self.ledger.list_plans()}
            except Exception:
                return None
            self._plans_at = time.monotonic()
        prices = self._plans.get(plan_id)
        return None if prices is None else cost_micros(event, prices)

    def observe_usage(self, gen: Generation, usage: Usage, event: Any,
                      cost: int | None) -> None:
        m = self.metrics
        tenant = m.tenant(gen.principal.tenant_name)
        m.prompt_tokens.labels("uncached", tenant).inc(usage.uncached_tokens)
        m.prompt_tokens.labels("cached", tenant).inc(usage.cached_tokens)
        m.prompt_tokens.labels("cache_write", tenant).inc(usage.cache_write_tokens)
        m.completion_tokens.labels(tenant).inc(usage.completion_tokens)
        if cost is not None:
            m.cost.labels(tenant).inc(cost)
        outcome = gen.cache_outcome()
        if gen.ttft_s is not None:
            m.ttft.labels(gen.endpoint, outcome).observe(gen.ttft_s)
        m.duration.labels(gen.endpoint, outcome).observe(gen.elapsed_s())


@dataclass
class RequestContext:
    """Per-request facts the middlewares and handlers share."""

    request_id: str  # ours: the engine and ledger key
    public_id: str  # what x-request-id says (the client's, when it sent a sane one)
    t0: float
    engine_s: float = 0.0
    ledger_s: float | None = None  # the usage commit, when it happened before the headers
    principal: Any = None


STATE = web.AppKey("kvgate_state", AppState)
CTX = web.RequestKey("kvgate_ctx", RequestContext)


def state_of(request: web.Request) -> AppState:
    return request.app[STATE]


def ctx_of(request: web.Request) -> RequestContext:
    return request[CTX]
