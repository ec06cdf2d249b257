"""The one usage record: what a request consumed, from the engine through HTTP to the ledger.

The engine fills it, the HTTP layer renders it in either API's shape, and the ledger bills
it; nobody copies its counts into a class of their own. Derived counts (uncached input,
cache writes by billing class) are computed here and nowhere else.

The cache reports how long what it wrote will live (TTL seconds); *classing* those writes
into the retention classes a plan prices ("5m" and "1h", Anthropic's; "24h", OpenAI's
extended retention) is a billing notion and lives here too, in ``ttl_class``.

Besides tokens, one record may carry reserved cache capacity held over time
(``reserved_byte_seconds``): a tenant's reservation is billed per byte-hour by records of
its own, one per tenant and billing interval, with no tokens; an explicit cache's pinned
tokens held over time (``stored_token_seconds``) likewise, one record per cache and interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TTL_CLASSES = ("5m", "1h", "24h")
FIVE_MINUTES_S = 300
ONE_HOUR_S = 3600
ONE_DAY_S = 86400


def ttl_class(ttl_s: float) -> str:
    """Billing class of a cache write: up to 5 minutes is "5m", up to an hour "1h", longer
    "24h" (a write is priced by the longest retention it was granted)."""
    if ttl_s <= FIVE_MINUTES_S:
        return "5m"
    return "1h" if ttl_s <= ONE_HOUR_S else "24h"


class InvalidUsage(ValueError):
    """Counts that cannot describe a real request (negative, or parts larger than the whole)."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request.

    ``prompt_tokens`` counts every input token; ``cached_tokens`` (read from the cache) and
    the cache writes are parts of it, the rest is uncached input. ``cache_writes`` maps the
    TTL in seconds of what this request wrote to the cache to the number of tokens written
    with it. ``completion_tokens`` counts every generated token, an EOS or stop token too.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_writes: Mapping[int, int] = field(default_factory=dict)
    completion_tokens: int = 0
    reserved_byte_seconds: int = 0
    stored_token_seconds: int = 0

    def __post_init__(self) -> None:
        # A copy, without zero entries: a caller's dict must not change the record later,
        # and two records with the same counts compare equal.
        object.__setattr__(self, "cache_writes",
                           {int(k): v for k, v in self.cache_writes.items() if v})

    @property
    def cache_write_tokens(self) -> int:
        return sum(self.cache_writes.values())

    @property
    def cache_write_5m_tokens(self) -> int:
        return self._writes_of("5m")

    @property
    def cache_write_1h_tokens(self) -> int:
        return self._writes_of("1h")

    @property
    def cache_write_24h_tokens(self) -> int:
        return self._writes_of("24h")

    @property
    def uncached_tokens(self) -> int:
        """Input neither read from nor written to the cache."""
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def _writes_of(self, cls: str) -> int:
        return sum(n for ttl, n in self.cache_writes.items() if ttl_class(ttl) == cls)

    def validate(self) -> None:
        """Raise ``InvalidUsage`` unless these counts can describe a real request."""
        counts = {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                  "completion_tokens": self.completion_tokens,
                  "reserved_byte_seconds": self.reserved_byte_seconds,
                  "stored_token_seconds": self.stored_token_seconds,
                  **{f"cache_writes[{k}]": v for k, v in self.cache_writes.items()}}
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidUsage(f"{name} must be a non-negative integer, got {value!r}")
            # token counts are 32-bit columns in the ledger (byte/token-seconds 64-bit): a
            # larger one is refused here, not by the database as if it were down
            top = (1 << 63) - 1 if name.endswith("_seconds") else (1 << 31) - 1
            if value > top:
                raise InvalidUsage(f"{name} is {value}, more than any request can have")
        if any(ttl <= 0 for ttl in self.cache_writes):
            raise InvalidUsage("cache write TTLs must be positive seconds")
        if self.uncached_tokens < 0:
            raise InvalidUsage(
                f"cached ({self.cached_tokens}) + cache-write ({self.cache_write_tokens}) "
                f"tokens exceed prompt_tokens ({self.prompt_tokens})")

    def to_json(self) -> dict[str, object]:
        """A plain dict (TTL keys as strings) for logs and spools; ``from_json`` reads it."""
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "cache_writes": {str(k): v for k, v in sorted(self.cache_writes.items())},
                "completion_tokens": self.completion_tokens,
                **({"reserved_byte_seconds": self.reserved_byte_seconds}
                   if self.reserved_byte_seconds else {}),
                **({"stored_token_seconds": self.stored_token_seconds}
                   if self.stored_token_seconds else {})}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Usage:
        writes = data.get("cache_writes") or {}
        if not isinstance(writes, Mapping):
            raise InvalidUsage("cache_writes must be an object")
        return cls(prompt_tokens=_int(data, "prompt_tokens"),
                   cached_tokens=_int(data, "cached_tokens"),
                   cache_writes={int(k): v for k, v in writes.items()},
                   completion_tokens=_int(data, "completion_tokens"),
                   reserved_byte_seconds=_int(data, "reserved_byte_seconds"),
                   stored_token_seconds=_int(data, "stored_token_seconds"))


def _int(data: Mapping[str, object], name: str) -> int:
    value = data.get(name, 0)
    if not isinstance(value, int):
        raise InvalidUsage(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class CacheDetail:
    """Which cache blocks a request's billed counts stand for, alongside its ``Usage``.

    ``read``: per block read from the cache (``Usage.cached_tokens``), its chain hash and
    the tier it was found on (``device``, ``host``, ``disk`` or ``shared``). ``written``: per block
    it wrote (``Usage.cache_writes``), its chain hash and TTL in seconds. Hashes are chain
    hashes rooted in the tenant's namespace: they name blocks, never their tokens.
    """

    read: tuple[tuple[bytes, str], ...] = ()
    written: tuple[tuple[bytes, int], ...] = ()

    def __add__(self, other: CacheDetail) -> CacheDetail:
        return CacheDetail(self.read + other.read, self.written + other.written)

    def to_json(self) -> dict[str, object]:
        """Hashes as hex, TTLs with their billing class; ``from_json`` reads it."""
        return {"read": [{"hash": h.hex(), "tier": tier} for h, tier in self.read],
                "written": [{"hash": h.hex(), "ttl_s": ttl, "ttl_class": ttl_class(ttl)}
                            for h, ttl in self.written]}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CacheDetail:
        read, written = data.get("read") or [], data.get("written") or []
        if not isinstance(read, list) or not isinstance(written, list):
            raise InvalidUsage("cache detail read and written must be lists")
        try:
            return cls(tuple((bytes.fromhex(b["hash"]), str(b["tier"])) for b in read),
                       tuple((bytes.fromhex(b["hash"]), int(b["ttl_s"])) for b in written))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidUsage(f"cache detail is malformed: {exc}") from None
