"""Cost arithmetic: integer micro-units, one upward rounding per event."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvgate.gateway.ledger import InvalidInput, Prices, cost_micros
from kvgate.gateway.ledger.billing import DEFAULT_PRICES
from kvgate.gateway.usage import Usage

from .conftest import NOW, event


def test_default_prices_follow_the_published_multipliers() -> None:
    p = DEFAULT_PRICES
    assert (p.input, p.cache_read, p.cache_write_5m, p.cache_write_1h, p.output) == (
        1_000_000, 100_000, 1_250_000, 2_000_000, 4_000_000)


def test_derived_prices_keep_explicit_ones() -> None:
    p = Prices.derived(3_000_000, output=15_000_000)
    assert (p.cache_read, p.cache_write_5m, p.cache_write_1h, p.output) == (
        300_000, 3_750_000, 6_000_000, 15_000_000)
    with pytest.raises(InvalidInput):
        Prices.derived(-1)


def test_cost_of_each_token_kind() -> None:
    # 36 uncached, 32 read, 16 + 16 written, 10 output on the default plan:
    # 36 + 3.2 + 20 + 32 + 40 = 131.2 micro-units, billed 132.
    e = event(1, prompt=100, cached=32, w5m=16, w1h=16, completion=10)
    assert e.usage.uncached_tokens == 36
    assert cost_micros(e.usage, DEFAULT_PRICES) == 132


def test_retention_classes_and_reserved_capacity() -> None:
    """Writes kept longer than an hour are the 24h class; a reservation row is priced per
    GiB-hour, in the same single rounding."""
    p = DEFAULT_PRICES
    assert (p.cache_write_24h, p.cache_reservation) == (3_000_000, 1_000_000)
    u = Usage(prompt_tokens=100, cache_writes={300: 16, 1800: 16, 86400: 32})
    assert (u.cache_write_5m_tokens, u.cache_write_1h_tokens, u.cache_write_24h_tokens) == (
        16, 16, 32)
    # 36 uncached + 16 × 1.25 + 16 × 2 + 32 × 3 = 184 micro-units
    assert cost_micros(u, p) == 184
    gib_hour = Usage(reserved_byte_seconds=(1 << 30) * 3600)
    assert cost_micros(gib_hour, p) == 1_000_000  # one GiB-hour at 1 unit
    one_byte_second = Usage(reserved_byte_seconds=1)
    assert cost_micros(one_byte_second, p) == 1  # rounded up, never down to free
    assert Usage.from_json(gib_hour.to_json()) == gib_hour


def test_rounding_happens_once_per_event_not_per_kind() -> None:
    # Each kind alone is 0.1 micro (would round up to 1 each = 5); together 0.5 → 1.
    prices = Prices(input=100_000, cache_read=100_000, cache_write_5m=100_000,
                    cache_write_1h=100_000, output=100_000)
    e = event(1, prompt=4, cached=1, w5m=1, w1h=1, completion=1)
    assert cost_micros(e.usage, prices) == 1
    assert cost_micros(event(1, prompt=0, completion=0).usage, prices) == 0


@given(prompt=st.integers(0, 10**7), split=st.tuples(*[st.floats(0, 1)] * 3),
       completion=st.integers(0, 10**6), prices=st.tuples(*[st.integers(0, 10**9)] * 5))
def test_cost_is_the_exact_amount_rounded_up(prompt: int, split: tuple[float, float, float],
                                             completion: int,
                                             prices: tuple[int, ...]) -> None:
    cached = int(prompt * split[0])
    w5m = int((prompt - cached) * split[1])
    w1h = int((prompt - cached - w5m) * split[2])
    e = event(1, prompt=prompt, cached=cached, w5m=w5m, w1h=w1h, completion=completion)
    p = Prices(*prices)
    exact = Fraction(e.usage.uncached_tokens * p.input + cached * p.cache_read
                     + w5m * p.cache_write_5m + w1h * p.cache_write_1h
                     + completion * p.output, 1_000_000)
    cost = cost_micros(e.usage, p)
    assert isinstance(cost, int)
    assert exact <= cost < exact + 1


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": 10, "cached": 8, "w5m": 3}, "exceed prompt_tokens"),
    ({"prompt": -1}, "non-negative"),
    ({"status": "weird"}, "status"),
])
def test_bad_events_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        event(1, **kwargs).validate()


def test_naive_times_are_rejected() -> None:
    import dataclasses
    e = dataclasses.replace(event(1), started_at=NOW.replace(tzinfo=None))
    with pytest.raises(InvalidInput, match="aware"):
        e.validate()


def test_stored_token_seconds_are_priced_per_million_token_hours() -> None:
    prices = Prices.derived(1_000_000)
    assert prices.cache_storage == 1_000_000
    # a million tokens for an hour at the storage price, and one token-second rounded up
    assert cost_micros(Usage(stored_token_seconds=3600 * 10**6), prices) == 1_000_000
    assert cost_micros(Usage(stored_token_seconds=1), prices) == 1
    both = Usage(prompt_tokens=10, stored_token_seconds=3600 * 2048)
    assert cost_micros(both, prices) == 10 + 2048
    assert Usage.from_json(both.to_json()) == both
