"""Prometheus metrics, one registry per app so tests and several apps never collide.

Counters the gateway drives live here; cache and engine figures are read from their
snapshots at scrape time (``_SnapshotCollector``) so they can never drift from
``/admin/cache/stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self, tenant_labels: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant_labels = tenant_labels
        r = self.registry
        self.requests = Counter("kvgate_requests", "HTTP requests served.",
                                ["endpoint", "status", "tenant"], registry=r)
        self.prompt_tokens = Counter("kvgate_prompt_tokens", "Billed prompt tokens by kind.",
                                     ["kind", "tenant"], registry=r)
        self.completion_tokens = Counter("kvgate_completion_tokens", "Billed completion tokens.",
                                         ["tenant"], registry=r)
        self.cost = Counter("kvgate_cost_micros", "Billed cost in micro-units.", ["tenant"],
                            registry=r)
        self.ttft = Histogram("kvgate_ttft_seconds", "Time to first token.",
                              ["endpoint", "cache"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("kvgate_request_duration_seconds", "End-to-end latency.",
                                  ["endpoint", "cache"], buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("kvgate_gateway_overhead_seconds",
                                  "Request time not spent in the engine.", ["endpoint"],
                                  buckets=_OVERHEAD_BUCKETS, registry=r)
        self.ledger_commit = Histogram("kvgate_ledger_commit_seconds",
                                       "Latency of one ledger group commit.",
                                       buckets=_OVERHEAD_BUCKETS, registry=r)

    def tenant(self, name: str | None) -> str:
        return (name or "none") if self.tenant_labels else "all"

    def watch(self, cache_stats: Callable[[], dict], engine: Any, ledger: Any) -> None:
        """Start exporting snapshot figures (called once engine and ledger are open)."""
        self.registry.register(_SnapshotCollector(cache_stats, engine, ledger))

    def on_ledger_commit(self, seconds: float, n_events: int = 0) -> None:
        self.ledger_commit.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else 0.0


def _tier(stats: dict, tier: str) -> dict:
    t = stats.get(tier) or stats.get("tiers", {}).get(tier) or {}
    return t if isinstance(t, dict) else {}


class _SnapshotCollector(Collector):
    def __init__(self, cache_stats: Callable[[], dict], engine: Any, ledger: Any) -> None:
        self._stats = cache_stats
        self._engine = engine
        self._ledger = ledger

    def describe(self) -> list:
        return []  # figures appear at scrape time only

    def collect(self) -> Iterator:
        try:
            stats = self._stats() or {}
        except Exception:
            stats = {}
        pages = GaugeMetricFamily("kvgate_cache_pages", "Cache pages by tier and state.",
                                  labels=["tier", "state"])
        size = GaugeMetricFamily("kvgate_cache_bytes", "Cache bytes by tier.",
                                 labels=["tier", "kind"])
        for tier in ("device", "host"):
            t = _tier(stats, tier)
            for state, n in (t.get("blocks") or t.get("pages_by_state") or {}).items():
                pages.add_metric([tier, str(state)], _num(n))
            size.add_metric([tier, "capacity"], _num(t.get("capacity_bytes")))
            size.add_metric([tier, "used"], _num(t.get("used_bytes")))
        yield pages
        yield size
        ev = CounterMetricFamily("kvgate_cache_evictions", "Cache evictions by reason.",
                                 labels=["reason"])
        evictions = stats.get("evictions") or {}
        for reason in ("lru", "ttl", "quota"):
            ev.add_metric([reason], _num(evictions.get(reason)))
        yield ev
        for name in ("promotion", "demotion"):
            moved = stats.get(name + "s") or {}
            yield CounterMetricFamily(f"kvgate_cache_{name}_bytes",
                                      f"Bytes copied by cache {name}s.",
                                      value=_num(moved.get("bytes") if isinstance(moved, dict)
                                                 else stats.get(f"{name}_bytes")))
        yield CounterMetricFamily("kvgate_cache_hit_tokens", "Prompt tokens served from cache.",
                                  value=_num(stats.get("hit_tokens")))
        yield CounterMetricFamily("kvgate_cache_miss_tokens", "Prompt tokens computed.",
                                  value=_num(stats.get("miss_tokens")))
        yield GaugeMetricFamily("kvgate_ledger_queue_depth", "Usage events awaiting commit.",
                                value=_call(self._ledger, "queue_depth"))
        yield GaugeMetricFamily("kvgate_engine_queue_depth", "Requests waiting for the engine.",
                                value=_call(self._engine, "queue_depth"))
        yield GaugeMetricFamily("kvgate_engine_running_requests", "Requests the engine runs.",
                                value=_call(self._engine, "num_running"))


def _call(obj: Any, name: str) -> float:
    try:
        return _num(getattr(obj, name)())
    except Exception:
        return 0.0
