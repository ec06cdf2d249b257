"""What one request costs: the usage event, a plan's prices and the one rounding rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kvgate.gateway.usage import CacheDetail, InvalidUsage, Usage

from .errors import InvalidInput

STATUSES = ("ok", "cancelled", "error", "interrupted")  # interrupted: a crash (checkpoints.py)
CACHE_KEY_MAX = 128  # characters of a prompt_cache_key kept with the usage row


def printable_key(text: str) -> bool:
    """No control or format characters (NUL, escapes, line breaks, bidirectional
    overrides) and no lone surrogates: what a database stores and a terminal shows as is."""
    return text.isprintable() and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
MICROS_PER_MILLION_TOKENS = 1_000_000  # prices are per million tokens
BYTE_SECONDS_PER_GIB_HOUR = (1 << 30) * 3600  # the reservation price is per GiB-hour
SECONDS_PER_HOUR = 3600  # the explicit cache storage price is per million token-hours


@dataclass(frozen=True)
class UsageEvent:
    """One finished request: its ``Usage`` and what the ledger files it under."""

    request_id: str
    tenant_id: int
    key_id: int | None
    model: str
    endpoint: str
    usage: Usage
    status: str
    started_at: datetime
    finished_at: datetime
    ttft_ms: int | None = None
    # The signed receipt the ledger stores with the row (``receipts``); None: no receipt
    receipt_id: str | None = None
    cache: CacheDetail = field(default_factory=CacheDetail)  # the blocks behind ``usage``
    cache_key: str | None = None  # prompt_cache_key / metadata.user_id, as the client sent it

    def validate(self) -> None:
        """Reject an event before it reaches the batch, so one bad event never fails others."""
        if not isinstance(self.request_id, str) or not 0 < len(self.request_id) <= 128:
            raise InvalidInput("request_id must be 1..128 characters")
        if not isinstance(self.usage, Usage):
            raise InvalidInput(f"usage must be a Usage record, got {type(self.usage).__name__}")
        try:
            self.usage.validate()
        except InvalidUsage as exc:
            raise InvalidInput(f"request {self.request_id}: {exc}") from None
        if self.status not in STATUSES:
            raise InvalidInput(f"status must be one of {STATUSES}, got {self.status!r}")
        for name in ("started_at", "finished_at"):
            value = getattr(self, name)
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise InvalidInput(f"{name} must be an aware datetime, got {value!r}")
        if self.ttft_ms is not None and self.ttft_ms < 0:
            raise InvalidInput("ttft_ms must be >= 0")
        if self.receipt_id is not None and (not isinstance(self.receipt_id, str)
                                            or not 0 < len(self.receipt_id) <= 64):
            raise InvalidInput("receipt_id must be 1..64 characters")
        if self.cache_key is not None and (not isinstance(self.cache_key, str)
                                           or len(self.cache_key) > CACHE_KEY_MAX
                                           or not printable_key(self.cache_key)):
            raise InvalidInput(f"cache_key must be a string of at most {CACHE_KEY_MAX} "
                               "printable characters")


@dataclass(frozen=True)
class Billed:
    """The ledger's answer to one ``record``: whether this call billed the request (False:
    its request id was billed before) and the cost of the event in micro-units of
    ``currency`` (the tenant's plan's). ``spooled``: the database was away, so the event
    waits, durable, in the local spool and is committed when the database is back; its cost
    is by the tenant's prices as this process last read them, and replay stores that cost."""

    new: bool
    cost_micros: int
    currency: str
    spooled: bool = False
    # Spooled but in memory only: the spool's disk failed (committer ``held``); lost if the
    # process dies before the disk or the database is back, so the caller keeps it too
    held: bool = False


@dataclass(frozen=True)
class Prices:
    """Integer micro-units per million tokens, one per billed token kind; and
    ``cache_reservation``, micro-units per GiB-hour of reserved cache capacity (each tier's
    reserved bytes count); ``cache_storage``, micro-units per million token-hours of an
    explicit cache's pinned tokens."""

    input: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    output: int
    cache_write_24h: int = 0
    cache_reservation: int = 0
    cache_storage: int = 0

    @classmethod
    def derived(cls, input: int, cache_read: int | None = None,
                cache_write_5m: int | None = None, cache_write_1h: int | None = None,
                output: int | None = None, cache_write_24h: int | None = None,
                cache_reservation: int | None = None,
                cache_storage: int | None = None) -> Prices:
        """Fill unspecified prices from the input price by the published convention:
        cache read 0.1×, 5-minute write 1.25×, 1-hour write 2×, output 4× (integer
        division, so a derived price never exceeds the exact multiple); and ours: 24-hour
        write 3×, a reserved GiB-hour 1× (the input price of a million tokens), a million
        token-hours of explicit cache storage 1×."""
        prices = cls(
            input=input,
            cache_read=input // 10 if cache_read is None else cache_read,
            cache_write_5m=input * 5 // 4 if cache_write_5m is None else cache_write_5m,
            cache_write_1h=input * 2 if cache_write_1h is None else cache_write_1h,
            output=input * 4 if output is None else output,
            cache_write_24h=input * 3 if cache_write_24h is None else cache_write_24h,
            cache_reservation=input if cache_reservation is None else cache_reservation,
            cache_storage=input if cache_storage is None else cache_storage,
        )
        prices.validate()
        return prices

    def validate(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidInput(f"price {name} must be a non-negative integer "
                                   f"(micro-units per million tokens), got {value!r}")


@dataclass(frozen=True)
class PlanPrices:
    """The plan a tenant was billed by: its id and name, prices and currency."""

    prices: Prices
    currency: str
    plan_id: int | None = None
    name: str | None = None


DEFAULT_PLAN = "default"
DEFAULT_PRICES = Prices.derived(1_000_000)  # 1 currency unit per million input tokens


def cost_micros(usage: Usage, prices: Prices) -> int:
    """Cost of one event in integer micro-units.

    The exact amount Σ tokens × price_per_million / 10⁶ (+ reserved byte-seconds ×
    price_per_GiB_hour / (2³⁰ × 3600) + stored token-seconds × price_per_million_token_hours
    / (10⁶ × 3600)) is summed over the kinds in integers first and
    rounded UP to a whole micro-unit once, per event: no floats, no per-kind rounding, so
    the ledger never bills less than the exact amount and by at most one micro-unit more.
    """
    tokens = (usage.uncached_tokens * prices.input
              + usage.cached_tokens * prices.cache_read
              + usage.cache_write_5m_tokens * prices.cache_write_5m
              + usage.cache_write_1h_tokens * prices.cache_write_1h
              + usage.cache_write_24h_tokens * prices.cache_write_24h
              + usage.completion_tokens * prices.output)
    reserved = usage.reserved_byte_seconds * prices.cache_reservation
    stored = usage.stored_token_seconds * prices.cache_storage
    # over the common denominator 10⁶ × 2³⁰ × 3600
    total = (tokens * BYTE_SECONDS_PER_GIB_HOUR + reserved * MICROS_PER_MILLION_TOKENS
             + stored * (BYTE_SECONDS_PER_GIB_HOUR // SECONDS_PER_HOUR))
    return -(-total // (MICROS_PER_MILLION_TOKENS * BYTE_SECONDS_PER_GIB_HOUR))
