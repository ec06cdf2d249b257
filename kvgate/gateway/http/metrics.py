"""Prometheus metrics, one registry per app so tests and several apps never collide.

Counters the gateway drives live here; cache and engine figures are read from their
snapshots at scrape time (``_SnapshotCollector``) so they can never drift from
``/admin/cache/stats``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvgate.gateway.edge.metrics import OVERHEAD_BUCKETS, RequestMetrics
from kvgate.gateway.ledger import Ledger
from kvgate.gateway.usage import Usage

if TYPE_CHECKING:  # the engine pulls in torch; the ledger-only CLI must not
    from kvgate.cachestore.stats import DiskTierStats, NamespaceStats, RemoteTierStats
    from kvgate.gateway.engine import EngineApi

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Prompt lengths (tokens) where the bands of ``TtftByLength`` start, after the first (0):
# under 1k, 1k to 4k, 4k to 16k, 16k and more.
PROMPT_BANDS = (1_000, 4_000, 16_000)


def prompt_band(prompt_tokens: int) -> int:
    """The index of the band a prompt of this length falls in."""
    return sum(prompt_tokens >= start for start in PROMPT_BANDS)


@dataclass(frozen=True)
class TtftTally:
    """Requests with a first token, their summed time to it, and their summed prompt
    tokens and tokens computed (not read from cache; cache writes are computed)."""

    requests: int = 0
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    computed_tokens: int = 0

    def plus(self, other: TtftTally) -> TtftTally:
        return TtftTally(self.requests + other.requests, self.ttft_s + other.ttft_s,
                         self.prompt_tokens + other.prompt_tokens,
                         self.computed_tokens + other.computed_tokens)


class TtftByLength:
    """Time to first token by prompt-length band and cache outcome, since the process
    started. A hit on a long prompt can take longer than a miss on a short one, so the
    console compares hits and misses within a band, never across all lengths. Kept for
    the console only: the exported histogram keeps its labels."""

    def __init__(self) -> None:
        self._tally: dict[tuple[int, str], TtftTally] = {}

    def add(self, usage: Usage, cache_outcome: str, ttft_s: float) -> None:
        key = (prompt_band(usage.prompt_tokens), cache_outcome)
        self._tally[key] = self._tally.get(key, TtftTally()).plus(TtftTally(
            1, ttft_s, usage.prompt_tokens, usage.prompt_tokens - usage.cached_tokens))

    def snapshot(self) -> dict[tuple[int, str], TtftTally]:
        """(band, cache outcome) → tally, as it is now (the tallies are immutable)."""
        return dict(self._tally)


class Metrics(RequestMetrics):
    """The replica's metrics: the edge's, billing, latency, admission, budgets, the ledger."""

    def __init__(self, tenant_labels: bool = True) -> None:
        super().__init__(tenant_labels)
        r = self.registry
        self.prompt_tokens = Counter("kvgate_prompt_tokens", "Billed prompt tokens by kind.",
                                     ["kind", "tenant"], registry=r)
        self.completion_tokens = Counter("kvgate_completion_tokens", "Billed completion tokens.",
                                         ["tenant"], registry=r)
        self.cost = Counter("kvgate_cost_micros", "Billed cost in micro-units.", ["tenant"],
                            registry=r)
        self.ttft = Histogram("kvgate_ttft_seconds", "Time to first token.",
                              ["endpoint", "cache"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft_by_length = TtftByLength()
        self.duration = Histogram("kvgate_request_duration_seconds", "End-to-end latency.",
                                  ["endpoint", "cache"], buckets=_LATENCY_BUCKETS, registry=r)
        self.admission_rejected = Counter(
            "kvgate_admission_rejected", "Requests turned away at admission, before any of "
            "their work, by reason (requests_per_minute, tokens_per_minute, concurrency, "
            "capacity, open_requests, budget).", ["reason", "tenant"], registry=r)
        self.budget_remaining = Gauge(
            "kvgate_budget_remaining_micros", "What is left of a tenant's spend budget this "
            "UTC day or month (period: daily, monthly), less the requests in flight, as this "
            "replica last saw it; negative once past it.", ["tenant", "period"], registry=r)
        self.reserved = Counter("kvgate_cache_reserved_byte_seconds",
                                "Billed reserved cache capacity (byte-seconds, all tiers).",
                                ["tenant"], registry=r)
        self._by_tenant = (self.requests, self.prompt_tokens, self.completion_tokens,
                           self.cost, self.admission_rejected, self.reserved,
                           self.budget_remaining)
        self.ledger_commit = Histogram("kvgate_ledger_commit_seconds",
                                       "Latency of one ledger group commit.",
                                       buckets=OVERHEAD_BUCKETS, registry=r)

    def forget_tenant(self, tenant_id: int) -> None:
        """A deleted tenant: drop its series, and ignore what its last in-flight requests
        would add (ids are never reused, so a deleted id stays deleted)."""
        label = str(int(tenant_id))
        self._forgotten.add(label)
        for metric in self._by_tenant:
            names = metric._labelnames  # the order ``remove`` takes them in
            seen = {tuple(s.labels[n] for n in names)
                    for family in metric.collect() for s in family.samples
                    if s.labels.get("tenant") == label}
            for values in seen:
                with contextlib.suppress(KeyError):
                    metric.remove(*values)

    def watch(self, engine: EngineApi, ledger: Ledger) -> None:
        """Start exporting snapshot figures (called once engine and ledger are open)."""
        self._engine = engine
        self.registry.register(_SnapshotCollector(engine, ledger, self))

    async def refresh(self) -> None:
        """The engine's figures as of now (from the engine core process, when it has one)."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.refresh()

    def on_ledger_commit(self, seconds: float, n_events: int = 0) -> None:
        self.ledger_commit.observe(seconds)

    def observe_usage(self, tenant: str, endpoint: str, usage: Usage, cost_micros: int,
                      cache_outcome: str, ttft_s: float | None, duration_s: float) -> None:
        """One billed request: ``tenant`` is its label value (see ``tenant``)."""
        if not self.counts(tenant):
            return
        self.prompt_tokens.labels("uncached", tenant).inc(usage.uncached_tokens)
        self.prompt_tokens.labels("cached", tenant).inc(usage.cached_tokens)
        self.prompt_tokens.labels("cache_write", tenant).inc(usage.cache_write_tokens)
        self.completion_tokens.labels(tenant).inc(usage.completion_tokens)
        self.cost.labels(tenant).inc(cost_micros)
        if ttft_s is not None:
            self.ttft.labels(endpoint, cache_outcome).observe(ttft_s)
            self.ttft_by_length.add(usage, cache_outcome, ttft_s)
        self.duration.labels(endpoint, cache_outcome).observe(duration_s)

    def observe_budget(self, tenant_id: int, period: str, remaining_micros: int | None) -> None:
        """A tenant's budget figure changed; None: it has no such budget now. Tenants are
        not summed: no series without tenant labels."""
        tenant = self.tenant(tenant_id)
        if not self.tenant_labels or not self.counts(tenant):
            return
        if remaining_micros is None:
            with contextlib.suppress(KeyError):
                self.budget_remaining.remove(tenant, period)
        else:
            self.budget_remaining.labels(tenant, period).set(remaining_micros)

    def observe_reservation(self, tenant: str, byte_seconds: int, cost_micros: int) -> None:
        """One billed interval of a tenant's cache reservation."""
        if not self.counts(tenant):
            return
        self.reserved.labels(tenant).inc(byte_seconds)
        self.cost.labels(tenant).inc(cost_micros)


# The figures read at scrape time: (name, kind, help, labels).
SNAPSHOT_FAMILIES = (
    ("kvgate_cache_pages", "gauge", "Cache pages by tier and state.", ("tier", "state")),
    ("kvgate_cache_bytes", "gauge", "Cache bytes by tier.", ("tier", "kind")),
    ("kvgate_cache_evictions", "counter", "Cache evictions by reason.", ("reason",)),
    ("kvgate_cache_promotion_bytes", "counter", "Bytes copied by cache promotions.", ()),
    ("kvgate_cache_demotion_bytes", "counter", "Bytes copied by cache demotions.", ()),
    ("kvgate_cache_hit_tokens", "counter", "Prompt tokens served from cache.", ()),
    ("kvgate_cache_miss_tokens", "counter",
     "Prompt tokens computed (cache writes included).", ()),
    ("kvgate_cache_share_bytes", "gauge",
     "A tenant's protected cache bytes by tier: its reservation (or, with --cache-shares, "
     "its fair share while active).", ("tier", "tenant")),
    ("kvgate_cache_tenant_bytes", "gauge",
     "Cache bytes a tenant holds by tier (what its share protects).", ("tier", "tenant")),
    ("kvgate_cache_evicted_by_others", "counter",
     "A tenant's cache blocks that left a tier for another tenant's allocation.",
     ("tier", "tenant")),
    ("kvgate_cache_share_fallbacks", "counter",
     "Protected cache blocks evicted because no share could absorb the pressure.", ()),
    ("kvgate_single_flight_requests", "counter",
     "Requests that waited for the same tenant's prompt blocks another request was "
     "computing (waited), and waits that reached the bound (timed_out).", ("outcome",)),
    ("kvgate_single_flight_saved_tokens", "counter",
     "Prompt tokens read from the cache instead of computed thanks to such waits.", ()),
    ("kvgate_shared_tier_blocks", "counter",
     "Shared-tier (Valkey) blocks by outcome: hit, miss, rejected (failed verification), "
     "written, dropped (not written).", ("kind",)),
    ("kvgate_shared_tier_bytes", "counter", "Shared-tier page bytes read and written.",
     ("kind",)),
    ("kvgate_shared_tier_errors", "counter", "Shared-tier calls that failed or timed out.", ()),
    ("kvgate_shared_tier_skipped", "counter",
     "Shared-tier fetches the cost model declined (recomputing was faster).", ()),
    ("kvgate_shared_tier_up", "gauge", "1 while the shared tier's circuit breaker is closed.",
     ()),
    ("kvgate_disk_tier_blocks", "counter",
     "Disk-tier blocks by outcome: hit, miss, rejected (failed verification), expired, "
     "written, dropped (not written), evicted (deleted for capacity).", ("kind",)),
    ("kvgate_disk_tier_bytes", "counter", "Disk-tier page bytes read and written.",
     ("kind",)),
    ("kvgate_disk_tier_errors", "counter",
     "Disk-tier reads and writes the file system refused (each a miss or a dropped write).",
     ()),
    ("kvgate_disk_tier_skipped", "counter",
     "Disk-tier reads the cost model declined (recomputing was faster).", ()),
    ("kvgate_disk_tier_used_bytes", "gauge",
     "Bytes of records in the disk tier, and its capacity.", ("kind",)),
    ("kvgate_disk_tier_up", "gauge", "1 while the disk tier's last file operation succeeded.",
     ()),
    ("kvgate_ledger_queue_depth", "gauge", "Usage events awaiting commit.", ()),
    ("kvgate_ledger_spool_events", "gauge",
     "Usage events spooled locally while the ledger database is away.", ()),
    ("kvgate_engine_queue_depth", "gauge", "Requests waiting for the engine.", ()),
    ("kvgate_engine_running_requests", "gauge", "Requests the engine runs.", ()),
    ("kvgate_engine_core_restarts", "counter",
     "Times the engine core process was started again after it died.", ()),
    ("kvgate_engine_parked_sequences", "gauge",
     "Sequences parked because their client stopped reading (no slot, no pages).", ()),
    ("kvgate_engine_preemptions", "counter",
     "Running sequences preempted: for pages, or to give another tenant a slot (fairness).",
     ("reason",)),
    ("kvgate_engine_tenant_service", "counter",
     "Weighted tokens the engine served a tenant with work (prefill 1, decode 2, cached "
     "0.1 per token): what fair scheduling equalises over scheduling weights.", ("tenant",)),
)


def snapshot_families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    """The scrape-time families, empty: what ``describe`` reports and ``collect`` fills."""
    out: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
    for name, kind, help_text, labels in SNAPSHOT_FAMILIES:
        family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        out[name] = family(name, help_text, labels=list(labels))
    return out


class _SnapshotCollector(Collector):
    """Cache and queue figures read at scrape time from the engine's and ledger's own
    snapshots (a figure a step old is fine here; nothing is locked for long)."""

    def __init__(self, engine: EngineApi, ledger: Ledger, metrics: Metrics | None = None) -> None:
        self._engine = engine
        self._ledger = ledger
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return list(snapshot_families().values())

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.cache_stats()
        f = snapshot_families()
        for tier_name, tier in (("device", stats.device), ("host", stats.host)):
            for state, n in tier.blocks.items():
                f["kvgate_cache_pages"].add_metric([tier_name, state], n)
            f["kvgate_cache_bytes"].add_metric([tier_name, "capacity"], tier.capacity_bytes)
            f["kvgate_cache_bytes"].add_metric([tier_name, "used"], tier.used_bytes)
        for reason, n in stats.evictions.as_dict().items():
            f["kvgate_cache_evictions"].add_metric([reason], n)
        for name, value in (("kvgate_cache_promotion_bytes", stats.promotions.bytes),
                            ("kvgate_cache_demotion_bytes", stats.demotions.bytes),
                            ("kvgate_cache_hit_tokens", stats.hit_tokens),
                            ("kvgate_cache_miss_tokens", stats.miss_tokens),
                            ("kvgate_ledger_queue_depth", self._ledger.queue_depth()),
                            ("kvgate_ledger_spool_events", self._ledger.spool_depth()),
                            ("kvgate_engine_queue_depth", self._engine.queue_depth()),
                            ("kvgate_engine_running_requests", self._engine.num_running()),
                            ("kvgate_engine_core_restarts", self._engine.restarts)):
            f[name].add_metric([], value)
        if stats.shares is not None:
            f["kvgate_cache_share_fallbacks"].add_metric([], stats.shares.fallbacks)
        waits = stats.single_flight
        f["kvgate_single_flight_requests"].add_metric(["waited"], waits.waited)
        f["kvgate_single_flight_requests"].add_metric(["timed_out"], waits.timed_out)
        f["kvgate_single_flight_saved_tokens"].add_metric([], waits.saved_tokens)
        self._collect_shares(stats.namespaces, f)
        self._collect_shared_tier(stats.remote, f)
        self._collect_disk_tier(stats.disk, f)
        self._collect_scheduling(f)
        yield from f.values()

    def _collect_scheduling(self, f: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        sched = self._engine.scheduling()
        f["kvgate_engine_parked_sequences"].add_metric([], sched["parked"])
        fair = sched["fairness_preemptions"]
        f["kvgate_engine_preemptions"].add_metric(["pages"], sched["preemptions"] - fair)
        f["kvgate_engine_preemptions"].add_metric(["fairness"], fair)
        sums: dict[str, float] = {}
        for name, acct in sched["accounts"].items():
            tid = name.removeprefix("tenant:")  # an account is a tenant id, or its namespace
            if not tid.isdigit():
                continue
            label = self._metrics.tenant(int(tid)) if self._metrics is not None else tid
            if self._metrics is not None and not self._metrics.counts(label):
                continue
            sums[label] = sums.get(label, 0.0) + acct["served_tokens"]
        for label, value in sorted(sums.items()):
            f["kvgate_engine_tenant_service"].add_metric([label], value)

    @staticmethod
    def _collect_shared_tier(shared: RemoteTierStats | None,
                             f: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        if shared is None:  # no --shared-tier-url: the families stay empty
            return
        for kind, n in (("hit", shared.hits), ("miss", shared.misses),
                        ("rejected", shared.rejected), ("written", shared.writes),
                        ("dropped", shared.dropped)):
            f["kvgate_shared_tier_blocks"].add_metric([kind], n)
        f["kvgate_shared_tier_bytes"].add_metric(["read"], shared.hit_bytes)
        f["kvgate_shared_tier_bytes"].add_metric(["written"], shared.write_bytes)
        f["kvgate_shared_tier_errors"].add_metric([], shared.errors)
        f["kvgate_shared_tier_skipped"].add_metric([], shared.skipped)
        f["kvgate_shared_tier_up"].add_metric([], int(shared.available))

    @staticmethod
    def _collect_disk_tier(disk: DiskTierStats | None,
                           f: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        if disk is None:  # no --disk-cache-dir: the families stay empty
            return
        for kind, n in (("hit", disk.hits), ("miss", disk.misses), ("rejected", disk.rejected),
                        ("expired", disk.expired), ("written", disk.writes),
                        ("dropped", disk.dropped), ("evicted", disk.evicted)):
            f["kvgate_disk_tier_blocks"].add_metric([kind], n)
        f["kvgate_disk_tier_bytes"].add_metric(["read"], disk.hit_bytes)
        f["kvgate_disk_tier_bytes"].add_metric(["written"], disk.write_bytes)
        f["kvgate_disk_tier_errors"].add_metric([], disk.errors)
        f["kvgate_disk_tier_skipped"].add_metric([], disk.skipped)
        f["kvgate_disk_tier_used_bytes"].add_metric(["used"], disk.used_bytes)
        f["kvgate_disk_tier_used_bytes"].add_metric(["capacity"], disk.capacity_bytes)
        f["kvgate_disk_tier_up"].add_metric([], int(disk.available))

    def _collect_shares(self, namespaces: dict[str, NamespaceStats],
                        f: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
        """Per tenant (``tenant:<id>`` namespaces only), labelled as requests are; with
        tenant labels off, summed under ``all``."""
        sums: dict[tuple[str, str, str], int] = {}
        for ns, n in namespaces.items():
            prefix, _, tid = ns.partition(":")
            if n.share is None or prefix != "tenant" or not tid.isdigit():
                continue
            label = self._metrics.tenant(int(tid)) if self._metrics is not None else tid
            if self._metrics is not None and not self._metrics.counts(label):
                continue
            for name, by_tier in (("kvgate_cache_share_bytes", n.share.share_bytes),
                                  ("kvgate_cache_tenant_bytes", n.share.used_bytes),
                                  ("kvgate_cache_evicted_by_others", n.share.evicted_by_others)):
                for tier, value in by_tier.items():
                    key = (name, tier, label)
                    sums[key] = sums.get(key, 0) + value
        for (name, tier, label), value in sorted(sums.items()):
            f[name].add_metric([tier, label], value)
