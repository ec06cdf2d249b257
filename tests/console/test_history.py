"""The cache history's ring buffer: bounded, oldest out first, and intervals that are the
differences between neighbouring samples."""

from __future__ import annotations

import pytest

from kvgate.gateway.http.console.history import CacheHistory, Sample


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


def test_a_history_needs_room_and_a_positive_interval() -> None:
    with pytest.raises(ValueError):
        CacheHistory(capacity=0)
    with pytest.raises(ValueError):
        CacheHistory(interval_s=0)
