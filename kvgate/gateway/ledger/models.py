"""The ledger's tables as typed SQLAlchemy models; Alembic revisions are the source of truth
for the schema, these models must match them (a test compares the two)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend.

    SQLite has no time zones, so values are stored there as naive UTC text; comparing and
    grouping by day then works on the stored text the same way it does on ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (e.g. UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Plan(Base):
    """Prices in integer micro-units per million tokens (1_000_000 = one unit of the plan's
    ``currency``, an ISO 4217 code, per million tokens); ``cache_reservation_price`` per
    GiB-hour of reserved cache capacity."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    input_price: Mapped[int] = mapped_column(BigInteger)
    cache_read_price: Mapped[int] = mapped_column(BigInteger)
    cache_write_5m_price: Mapped[int] = mapped_column(BigInteger)
    cache_write_1h_price: Mapped[int] = mapped_column(BigInteger)
    output_price: Mapped[int] = mapped_column(BigInteger)
    cache_write_24h_price: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cache_reservation_price: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # Per million token-hours of an explicit cache's pinned tokens
    cache_storage_price: Mapped[int] = mapped_column(BigInteger, server_default="0")
    currency: Mapped[str] = mapped_column(String(3), server_default="USD")
    # The plan's tenants' share of the engine under contention, relative to weight 1
    scheduling_weight: Mapped[int] = mapped_column(
        Integer, CheckConstraint("scheduling_weight >= 1 AND scheduling_weight <= 1000",
                                 name="ck_plans_scheduling_weight"), server_default="1")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    plan_id: Mapped[int] = mapped_column(ForeignKey("plans.id"), index=True)
    cache_ttl_seconds: Mapped[int] = mapped_column(Integer, default=300)
    cache_quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Reserved cache capacity (bytes) on this tier of every replica; None: no reservation.
    cache_reserved_device_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cache_reserved_host_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The longest cache TTL a request may ask for (prompt_cache_retention, cache_control.ttl)
    cache_max_ttl_seconds: Mapped[int] = mapped_column(Integer, server_default="86400")
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    # Spend budgets (micro-units of the plan's currency per UTC day / month); None: none
    budget_daily_micros: Mapped[int | None] = mapped_column(BigInteger)
    budget_monthly_micros: Mapped[int | None] = mapped_column(BigInteger)
    # The lowest request priority its requests may ask for (lower runs first; 0: none
    # ahead of the default class) and its cap on running sequences (None: none)
    min_priority: Mapped[int] = mapped_column(
        Integer, CheckConstraint("min_priority >= -1000 AND min_priority <= 1000",
                                 name="ck_tenants_min_priority"), server_default="0")
    max_running_sequences: Mapped[int | None] = mapped_column(
        Integer, CheckConstraint("max_running_sequences >= 1",
                                 name="ck_tenants_max_running_sequences"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """Only the SHA-256 of a key is stored; the short prefix lets people tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # This key's own spend budgets, besides its tenant's (as ``Tenant``); None: none
    budget_daily_micros: Mapped[int | None] = mapped_column(BigInteger)
    budget_monthly_micros: Mapped[int | None] = mapped_column(BigInteger)


class UsageRow(Base):
    """One finished request; ``request_id`` is unique so a retried record bills nothing twice."""

    __tablename__ = "usage_events"
    __table_args__ = (
        Index("ix_usage_tenant_time", "tenant_id", "started_at"),
        Index("ix_usage_key_time", "key_id", "started_at"),
        Index("ix_usage_time", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(256))
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    cache_write_5m_tokens: Mapped[int] = mapped_column(Integer)
    cache_write_1h_tokens: Mapped[int] = mapped_column(Integer)
    cache_write_24h_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer)
    # Reserved capacity held over the row's interval (reservation rows; 0 for requests)
    reserved_byte_seconds: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # An explicit cache's tokens held over the row's interval (storage rows; 0 for requests)
    stored_token_seconds: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The request's prompt_cache_key (OpenAI) or metadata.user_id (Anthropic), if it sent one
    cache_key: Mapped[str | None] = mapped_column(String(128))
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    # The plan's currency when the event was billed: moving the tenant to another plan
    # later never restates what this row cost.
    currency: Mapped[str] = mapped_column(String(3), server_default="USD")
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ttft_ms: Mapped[int | None] = mapped_column(Integer)


class StoredResponse(Base):
    """A Responses API answer kept for ``previous_response_id`` and ``GET /v1/responses/{id}``:
    the response object and the conversation up to and including it (JSON text), readable
    by its tenant only, until ``expires_at``."""

    __tablename__ = "stored_responses"
    __table_args__ = (Index("ix_stored_responses_expires_at", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    response: Mapped[str] = mapped_column(Text)
    conversation: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ReceiptRow(Base):
    """The signed receipt of one billed request (``receipts``): written in the transaction
    that writes its usage row, from the same event; readable by its tenant only. ``body``
    is the receipt's JSON as served, signature included."""

    __tablename__ = "receipts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExplicitCacheRow(Base):
    """An explicit cache (``/v1/caches``): a prompt prefix a tenant asked to keep, pinned
    on every replica that uses it until ``expires_at`` or deletion. ``prefix`` is the
    template's messages and tools (JSON text) the prefix renders from; ``tokens`` how many
    tokens that rendering is. Readable by its tenant only."""

    __tablename__ = "explicit_caches"
    __table_args__ = (Index("ix_explicit_caches_tenant", "tenant_id", "deleted_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    display_name: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    prefix: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
