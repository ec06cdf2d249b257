"""Prometheus metrics every front end has (one registry per app, so tests and several apps
never collide): requests by endpoint, status and tenant, the time a request spends outside
the engine, (``/metrics`` is ``scrape``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class RequestMetrics:
    def __init__(self, tenant_labels: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant_labels = tenant_labels
        self.requests = Counter("kvgate_requests", "HTTP requests served.",
                                ["endpoint", "status", "tenant"], registry=self.registry)
        self.overhead = Histogram("kvgate_gateway_overhead_seconds",
                                  "Request time not spent in the engine.", ["endpoint"],
                                  buckets=OVERHEAD_BUCKETS, registry=self.registry)
        self._forgotten: set[str] = set()
        self.listen_port: int | None = None  # the metrics listener's port, once it listens

    async def refresh(self) -> None:
        """Before a scrape renders: fetch figures that live in another process (none here)."""

    def tenant(self, tenant_id: int | None) -> str:
        """The ``tenant`` label value: the tenant's id (digits, so never one of the reserved
        values), ``none`` for a request no tenant made, ``all`` with tenant labels off.
        Names are never exported: /metrics must not list who the customers are."""
        if not self.tenant_labels:
            return "all"
        return "none" if tenant_id is None else str(int(tenant_id))

    def counts(self, tenant: str) -> bool:
        """False for a deleted tenant's label: its series are gone and stay gone."""
        return tenant not in self._forgotten

    def render(self) -> bytes:
        return generate_latest(self.registry)
