"""The cache history's ring buffer: bounded, oldest out first, and intervals that are the
differences between neighbouring samples."""

from __future__ import annotations

import pytest

from kvgate.gateway.http.console.history import CacheHistory, Sample, ttft_by_length
from kvgate.gateway.http.metrics import Metrics, TtftTally, prompt_band
from kvgate.gateway.usage import Usage


def _sample(t: float, hit: int, miss: int, requests: int = 0, errors: int = 0,
            lru: int = 0, ttft_hit: tuple[float, int] = (0.0, 0),
            ttft_miss: tuple[float, int] = (0.0, 0)) -> Sample:
    return Sample(t=t, hit_tokens=hit, miss_tokens=miss,
                  evictions={"lru": lru, "ttl": 0, "quota": 0},
                  tiers={"device": {"used_bytes": hit, "capacity_bytes": 1000}},
                  requests=requests, errors=errors,
                  ttft_sum_s={"hit": ttft_hit[0], "partial": 0.0, "miss": ttft_miss[0]},
                  ttft_count={"hit": ttft_hit[1], "partial": 0, "miss": ttft_miss[1]})


def test_the_ring_is_bounded_and_drops_the_oldest() -> None:
    history = CacheHistory(capacity=3, interval_s=1.0)
    for i in range(10):
        history.record(_sample(1_000_000.0 + i, hit=i, miss=0))
    assert len(history) == 3
    points = history.points()
    assert [p["t"] for p in points] == [
        "1970-01-12T13:46:47Z", "1970-01-12T13:46:48Z", "1970-01-12T13:46:49Z"]
    assert [p["hit_tokens"] for p in points] == [7, 1, 1]  # the first: since start


def test_points_are_differences_and_end_with_now() -> None:
    history = CacheHistory(capacity=10, interval_s=5.0)
    history.record(_sample(100.0, hit=0, miss=100, requests=1, ttft_miss=(0.5, 1)))
    history.record(_sample(105.0, hit=300, miss=120, requests=4, errors=1, lru=2,
                           ttft_hit=(0.03, 3), ttft_miss=(0.5, 1)))
    now = _sample(107.0, hit=300, miss=120, requests=4, errors=1, lru=2,
                  ttft_hit=(0.03, 3), ttft_miss=(0.5, 1))
    first, second, last = history.points(now)
    assert (first["hit_ratio"], first["ttft_miss_ms"], first["ttft_hit_ms"]) == (0.0, 500.0, None)
    assert (second["hit_tokens"], second["miss_tokens"], second["requests"],
            second["errors"]) == (300, 20, 3, 1)
    assert second["hit_ratio"] == pytest.approx(300 / 320, abs=1e-6)
    assert second["evictions"] == {"lru": 2, "ttl": 0, "quota": 0}
    assert second["ttft_hit_ms"] == 10.0 and second["ttft_miss_ms"] is None
    assert last["hit_tokens"] == 0 and last["hit_ratio"] is None  # nothing happened since
    totals = CacheHistory.totals(now)
    assert (totals["ttft_hit_ms"], totals["ttft_miss_ms"], totals["hit_ratio"]) == (
        10.0, 500.0, pytest.approx(300 / 420, abs=1e-6))


def test_prompt_bands_start_at_1k_4k_and_16k() -> None:
    assert [prompt_band(n) for n in (0, 999, 1000, 3999, 4000, 15_999, 16_000, 10**6)] == [
        0, 0, 1, 1, 2, 2, 3, 3]


def test_hits_and_misses_are_compared_within_a_prompt_length_band() -> None:
    """A hit on a long prompt (1,146 ms) next to a miss on a short one (519 ms) made hits
    look slower over all lengths; by band each is beside its like."""
    metrics = Metrics()
    for usage, outcome, ttft_s in [
            (Usage(20_000, 19_968, {}, 1), "hit", 1.146),  # long, nearly all read
            (Usage(20_000, 0, {300: 19_968}, 1), "miss", 3.0),  # long, computed
            (Usage(500, 0, {300: 496}, 1), "miss", 0.519),  # short, computed
            (Usage(600, 512, {}, 1), "partial", 0.05),  # short, mostly read
            (Usage(2_000, 0, {}, 1), "miss", 0.9)]:
        metrics.observe_usage("1", "chat.completions", usage, 0, outcome, ttft_s, ttft_s)
    sample = Sample(0.0, 0, 0, {}, {}, 0, 0,
                    ttft_by_length=metrics.ttft_by_length.snapshot())
    short, mid, long_, longest = ttft_by_length(sample)
    assert [b["label"] for b in (short, mid, long_, longest)] == [
        "under 1k", "1k–4k", "4k–16k", "16k and more"]
    assert [(b["prompt_tokens_from"], b["prompt_tokens_below"])
            for b in (short, mid, long_, longest)] == [
        (0, 1000), (1000, 4000), (4000, 16000), (16000, None)]
    assert longest["hit"] == {"requests": 1, "ttft_ms": 1146.0, "mean_prompt_tokens": 20_000,
                              "mean_computed_tokens": 32}
    assert longest["miss"] == {"requests": 1, "ttft_ms": 3000.0, "mean_prompt_tokens": 20_000,
                               "mean_computed_tokens": 20_000}
    assert short["hit"]["ttft_ms"] == 50.0 and short["miss"]["ttft_ms"] == 519.0
    assert mid["hit"] == {"requests": 0, "ttft_ms": None, "mean_prompt_tokens": None,
                          "mean_computed_tokens": None}
    assert mid["miss"]["requests"] == 1 and long_["miss"]["requests"] == 0
    for band in (short, longest):  # where both were seen, the hit is the faster
        assert band["hit"]["ttft_ms"] < band["miss"]["ttft_ms"]


def test_totals_carry_the_bands_and_partial_hits_count_as_hits() -> None:
    tally = {(0, "hit"): TtftTally(2, 0.2, 1000, 100), (0, "partial"): TtftTally(1, 0.4, 900, 300),
             (3, "miss"): TtftTally(1, 2.0, 30_000, 30_000)}
    now = Sample(10.0, 0, 0, {}, {}, 0, 0, ttft_by_length=tally)
    bands = CacheHistory.totals(now)["ttft_by_prompt_length"]
    assert isinstance(bands, list) and len(bands) == 4
    assert bands[0]["hit"] == {"requests": 3, "ttft_ms": 200.0, "mean_prompt_tokens": 633,
                               "mean_computed_tokens": 133}
    assert bands[3]["miss"]["ttft_ms"] == 2000.0 and bands[3]["hit"]["requests"] == 0


def test_a_history_needs_room_and_a_positive_interval() -> None:
    with pytest.raises(ValueError):
        CacheHistory(capacity=0)
    with pytest.raises(ValueError):
        CacheHistory(interval_s=0)
