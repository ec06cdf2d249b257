"""The times people type for a report's ``since`` and ``until``: one parser, so the admin
API and the CLI accept exactly the same forms and say the same thing about a bad one.

- a date, ``2026-11-30``: midnight UTC at its start;
- a time without a zone, ``2026-11-30T10:00`` or ``2026-11-30 10:00:00``: taken as UTC;
- a time with one, ``2026-11-30T10:00:00+02:00`` or ``…Z``;
- a span back from now, ``30m``, ``12h``, ``7d``, ``2w`` (also ``45s``).

In a URL a ``+`` that is not percent-encoded (``%2B``) arrives as a space; a zone written
that way (``2026-11-30T10:00:00 02:00``) is read as the ``+02:00`` that was meant.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from .errors import InvalidInput

FORMS = ("2026-11-30, 2026-11-30T10:00:00 (UTC), 2026-11-30T10:00:00+02:00, "
         "2026-11-30T10:00:00Z, or a span back from now: 30m, 12h, 7d")

_SPAN = re.compile(r"(\d{1,9})\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# A time whose "+HH:MM" zone lost its "+" to URL decoding.
_SPACED_ZONE = re.compile(r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware UTC datetime for one of the forms above; ``InvalidInput`` (a ValueError)
    naming the accepted forms for anything else. ``now`` anchors spans (tests)."""
    raw = text.strip()
    try:
        span = _SPAN.fullmatch(raw)
        if span:
            reference = now if now is not None else datetime.now(UTC)
            return reference.astimezone(UTC) - timedelta(
                **{_UNITS[span.group(2)]: int(span.group(1))})
        iso = _SPACED_ZONE.sub(r"\1+\2", raw)
        if iso[-1:] in ("Z", "z"):
            iso = iso[:-1] + "+00:00"  # fromisoformat takes "Z" only from Python 3.11
        value = datetime.fromisoformat(iso)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: before year 1 or after 9999
        raise InvalidInput(f"not a time: {text!r} (use {FORMS})") from None


def check_range(since: datetime | None, until: datetime | None) -> None:
    """Refuse an empty range, which is always a mistake (the ends swapped, a span given
    to ``until`` meant for ``since``) rather than a question whose answer is zero."""
    if since is not None and until is not None and until <= since:
        raise InvalidInput(f"until ({until.isoformat()}) must be after since "
                           f"({since.isoformat()}): since is inclusive, until exclusive")
