"""The one parser of report times that ``/admin/usage`` and ``kvgate usage`` share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from kvgate.gateway.ledger import InvalidInput
from kvgate.gateway.ledger.timespec import check_range, parse_time

UTC = UTC
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-30", datetime(2026, 11, 30, tzinfo=UTC)),  # a date: midnight UTC
    ("2026-11-30T10:00", datetime(2026, 11, 30, 10, tzinfo=UTC)),  # naive: UTC
    ("2026-11-30 10:00:00", datetime(2026, 11, 30, 10, tzinfo=UTC)),
    ("2026-11-30T10:00:00.250", datetime(2026, 11, 30, 10, 0, 0, 250_000, tzinfo=UTC)),
    ("2026-11-30T10:00:00+02:00", datetime(2026, 11, 30, 8, tzinfo=UTC)),  # aware
    ("2026-11-30T10:00:00-05:30", datetime(2026, 11, 30, 15, 30, tzinfo=UTC)),
    ("2026-11-30T10:00:00Z", datetime(2026, 11, 30, 10, tzinfo=UTC)),
    ("2026-11-30T10:00:00z", datetime(2026, 11, 30, 10, tzinfo=UTC)),
    # "+02:00" unencoded in a URL query arrives as " 02:00"
    ("2026-11-30T10:00:00 02:00", datetime(2026, 11, 30, 8, tzinfo=UTC)),
    ("2026-11-30 10:00 0200", datetime(2026, 11, 30, 8, tzinfo=UTC)),
    ("  2026-11-30  ", datetime(2026, 11, 30, tzinfo=UTC)),
])
def test_dates_and_times(text: str, expected: datetime) -> None:
    value = parse_time(text)
    assert value == expected
    assert value.tzinfo is UTC  # always aware, always UTC


@pytest.mark.parametrize(("text", "back"), [
    ("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
    ("45s", timedelta(seconds=45)), ("2w", timedelta(weeks=2)), ("0d", timedelta(0)),
    ("7 d", timedelta(days=7)),
])
def test_spans_back_from_now(text: str, back: timedelta) -> None:
    assert parse_time(text, now=NOW) == NOW - back
    before = datetime.now(UTC)
    value = parse_time(text)  # without `now`: the clock
    assert before - back <= value <= datetime.now(UTC) - back


def test_a_span_from_an_aware_now_in_another_zone_is_utc() -> None:
    paris = timezone(timedelta(hours=1))
    value = parse_time("1h", now=datetime(2026, 11, 30, 13, 0, tzinfo=paris))
    assert value == datetime(2026, 11, 30, 11, 0, tzinfo=UTC) and value.tzinfo is UTC


@pytest.mark.parametrize("text", [
    "", "   ", "yesterday", "7", "d", "7y", "-7d", "7days", "2026-13-01", "2026-11-31",
    "2026-11-30T25:00", "30/11/2026", "2026-11-30T10:00:00+25:00", "99999999999d",
    "999999999w", "0001-01-01T00:00+14:00", "2026-11-30T10:00:00 X",
])
def test_bad_input_names_the_forms(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"not a time: .*2026-11-30T10:00:00Z.*7d"):
        parse_time(text)
    with pytest.raises(ValueError):  # InvalidInput is a ValueError for plain callers
        parse_time(text)


def test_empty_range_is_refused() -> None:
    check_range(None, NOW)
    check_range(NOW, None)
    check_range(NOW, NOW + timedelta(microseconds=1))
    for until in (NOW, NOW - timedelta(days=1)):
        with pytest.raises(InvalidInput, match=r"until .* must be after since"):
            check_range(NOW, until)
