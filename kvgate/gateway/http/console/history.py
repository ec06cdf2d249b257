"""Cache statistics over time, per process: a ring buffer of snapshots taken every few
seconds, so the console can draw the last hour without Prometheus.

A ``Sample`` holds running totals (hit and miss tokens, evictions by reason, HTTP requests
and errors, TTFT sums and counts by cache outcome, the same by prompt-length band) and gauges
(tier occupancy). The
series the console draws are differences between neighbouring samples, worked out by
``points``. The buffer is bounded (``capacity`` samples), so memory never grows with
uptime; a restarted process starts a new history (the ledger keeps the billed past).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from kvgate.cachestore.stats import CacheStats
from kvgate.gateway.http.metrics import PROMPT_BANDS, Metrics, TtftTally
from kvgate.gateway.http.state import STATE, NotOpen, state_of

log = logging.getLogger("kvgate.console")

SAMPLE_INTERVAL_S = 10.0
CAPACITY = 720  # two hours at the default interval
_OUTCOMES = ("hit", "partial", "miss")


@dataclass(frozen=True)
class Sample:
    t: float  # wall-clock seconds (UTC)
    hit_tokens: int
    miss_tokens: int
    evictions: dict[str, int]
    tiers: dict[str, dict[str, int]]  # tier -> used_bytes, capacity_bytes
    requests: int
    errors: int  # HTTP responses with status >= 400
    ttft_sum_s: dict[str, float] = field(default_factory=dict)  # cache outcome -> seconds
    ttft_count: dict[str, int] = field(default_factory=dict)
    # (prompt-length band, cache outcome) -> tally (``metrics.TtftByLength``)
    ttft_by_length: dict[tuple[int, str], TtftTally] = field(default_factory=dict)


def take_sample(stats: CacheStats, metrics: Metrics, now: float | None = None) -> Sample:
    requests = errors = 0
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                requests += int(s.value)
                if s.labels.get("status", "").isdigit() and int(s.labels["status"]) >= 400:
                    errors += int(s.value)
    ttft_sum: dict[str, float] = dict.fromkeys(_OUTCOMES, 0.0)
    ttft_count: dict[str, int] = dict.fromkeys(_OUTCOMES, 0)
    for family in metrics.ttft.collect():
        for s in family.samples:
            outcome = s.labels.get("cache", "")
            if outcome not in ttft_sum:
                continue
            if s.name.endswith("_sum"):
                ttft_sum[outcome] += s.value
            elif s.name.endswith("_count"):
                ttft_count[outcome] += int(s.value)
    return Sample(
        t=time.time() if now is None else now,
        hit_tokens=stats.hit_tokens, miss_tokens=stats.miss_tokens,
        evictions={k: int(v) for k, v in stats.evictions.as_dict().items()},
        tiers={name: {"used_bytes": tier.used_bytes, "capacity_bytes": tier.capacity_bytes}
               for name, tier in (("device", stats.device), ("host", stats.host))},
        requests=requests, errors=errors, ttft_sum_s=ttft_sum, ttft_count=ttft_count,
        ttft_by_length=metrics.ttft_by_length.snapshot())


def _mean_ms(total_s: float, count: int) -> float | None:
    return round(total_s / count * 1000.0, 3) if count else None


def _hit_ttft(sample: Sample) -> tuple[float, int]:
    """Hits and partial hits together: a request that read any of its prompt from cache."""
    return (sample.ttft_sum_s.get("hit", 0.0) + sample.ttft_sum_s.get("partial", 0.0),
            sample.ttft_count.get("hit", 0) + sample.ttft_count.get("partial", 0))


def _band_label(start: int, end: int | None) -> str:
    def k(n: int) -> str:
        return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"
    if not start:
        return f"under {k(end or 0)}"
    return f"{k(start)} and more" if end is None else f"{k(start)}–{k(end)}"


def _ttft_cell(t: TtftTally) -> dict[str, object]:
    n = t.requests
    return {"requests": n, "ttft_ms": _mean_ms(t.ttft_s, n),
            "mean_prompt_tokens": round(t.prompt_tokens / n) if n else None,
            "mean_computed_tokens": round(t.computed_tokens / n) if n else None}


def ttft_by_length(sample: Sample) -> list[dict[str, object]]:
    """Mean time to first token of hits (any of the prompt read from cache: hits and
    partial hits) and of misses, per prompt-length band, each with the mean prompt length
    and tokens computed behind it: like compared with like."""
    starts = (0, *PROMPT_BANDS)
    rows: list[dict[str, object]] = []
    for band, start in enumerate(starts):
        end = starts[band + 1] if band + 1 < len(starts) else None
        tally = sample.ttft_by_length
        hit = tally.get((band, "hit"), TtftTally()).plus(
            tally.get((band, "partial"), TtftTally()))
        rows.append({"label": _band_label(start, end), "prompt_tokens_from": start,
                     "prompt_tokens_below": end, "hit": _ttft_cell(hit),
                     "miss": _ttft_cell(tally.get((band, "miss"), TtftTally()))})
    return rows


def _point(prev: Sample | None, cur: Sample) -> dict[str, object]:
    """One interval: what happened between ``prev`` and ``cur`` (since start for the
    first), and the gauges at ``cur``."""
    zero = Sample(cur.t, 0, 0, dict.fromkeys(cur.evictions, 0), {}, 0, 0)
    p = prev or zero
    hit = cur.hit_tokens - p.hit_tokens
    miss = cur.miss_tokens - p.miss_tokens
    hs, hc = _hit_ttft(cur)
    phs, phc = _hit_ttft(p)
    ms = cur.ttft_sum_s.get("miss", 0.0) - p.ttft_sum_s.get("miss", 0.0)
    mc = cur.ttft_count.get("miss", 0) - p.ttft_count.get("miss", 0)
    return {
        "t": datetime.fromtimestamp(cur.t, UTC).isoformat().replace("+00:00", "Z"),
        "hit_tokens": hit, "miss_tokens": miss,
        "hit_ratio": round(hit / (hit + miss), 6) if hit + miss else None,
        "evictions": {k: v - p.evictions.get(k, 0) for k, v in cur.evictions.items()},
        "requests": cur.requests - p.requests, "errors": cur.errors - p.errors,
        "ttft_hit_ms": _mean_ms(hs - phs, hc - phc), "ttft_miss_ms": _mean_ms(ms, mc),
        "tiers": cur.tiers,
    }


class CacheHistory:
    """The ring buffer. ``record`` appends (the oldest sample falls out when full)."""

    def __init__(self, capacity: int = CAPACITY, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        if capacity < 1 or interval_s <= 0:
            raise ValueError("capacity must be >= 1 and interval_s > 0")
        self.capacity = capacity
        self.interval_s = interval_s
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, sample: Sample) -> None:
        self._samples.append(sample)

    def points(self, now: Sample | None = None) -> list[dict[str, object]]:
        """Intervals between stored samples, then from the last one to ``now`` (a sample
        taken for this answer and not stored)."""
        samples = list(self._samples) + ([now] if now is not None else [])
        return [_point(samples[i - 1] if i else None, s) for i, s in enumerate(samples)]

    @staticmethod
    def totals(now: Sample) -> dict[str, object]:
        """Since the process started: hit ratio, requests, errors, TTFT hit vs miss (over
        every prompt length, and by prompt-length band: what the console shows)."""
        hs, hc = _hit_ttft(now)
        total = now.hit_tokens + now.miss_tokens
        return {"hit_tokens": now.hit_tokens, "miss_tokens": now.miss_tokens,
                "hit_ratio": round(now.hit_tokens / total, 6) if total else None,
                "requests": now.requests, "errors": now.errors,
                "evictions": dict(now.evictions),
                "ttft_hit_ms": _mean_ms(hs, hc),
                "ttft_miss_ms": _mean_ms(now.ttft_sum_s.get("miss", 0.0),
                                         now.ttft_count.get("miss", 0)),
                "ttft_hit_count": hc, "ttft_miss_count": now.ttft_count.get("miss", 0),
                "ttft_by_prompt_length": ttft_by_length(now)}


HISTORY = web.AppKey("kvgate_cache_history", CacheHistory)


def sampler(history: CacheHistory,
            clock: Callable[[], float] = time.time
            ) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    """A cleanup context that samples the app's cache and metrics every interval while the
    app runs (appended after the context that opens the engine)."""

    @contextlib.asynccontextmanager
    async def run(app: web.Application) -> AsyncIterator[None]:
        app[HISTORY] = history

        async def loop() -> None:
            while True:
                await asyncio.sleep(history.interval_s)
                try:
                    state = app[STATE]
                    history.record(take_sample(state.engine.cache_stats(), state.metrics,
                                               clock()))
                except NotOpen:
                    continue
                except Exception:  # a failed sample must never end the history
                    log.exception("cache history sample failed")

        task = asyncio.create_task(loop(), name="kvgate-cache-history")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


def history_of(request: web.Request) -> CacheHistory:
    history = request.app.get(HISTORY)
    if history is None:  # an app built without the sampler: an empty history
        history = CacheHistory()
    return history


def now_sample(request: web.Request) -> Sample:
    state = state_of(request)
    return take_sample(state.engine.cache_stats(), state.metrics)
