"""Initial ledger schema: plans, tenants, api keys, usage events; the default plan.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Micro-units per million tokens: 1.00 per M input; cache read 0.1x, 5m write 1.25x,
# 1h write 2x (the published convention), output 4x.
DEFAULT_PLAN = {"name": "default", "input_price": 1_000_000, "cache_read_price": 100_000,
                "cache_write_5m_price": 1_250_000, "cache_write_1h_price": 2_000_000,
                "output_price": 4_000_000}

TS = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("input_price", sa.BigInteger, nullable=False),
        sa.Column("cache_read_price", sa.BigInteger, nullable=False),
        sa.Column("cache_write_5m_price", sa.BigInteger, nullable=False),
        sa.Column("cache_write_1h_price", sa.BigInteger, nullable=False),
        sa.Column("output_price", sa.BigInteger, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("plan_id", sa.Integer, sa.ForeignKey("plans.id"), nullable=False),
        sa.Column("cache_ttl_seconds", sa.Integer, nullable=False),
        sa.Column("cache_quota_bytes", sa.BigInteger, nullable=True),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("tokens_per_minute", sa.Integer, nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_tenants_plan_id", "tenants", ["plan_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "usage_events",
        sa.Column("id", BIG_ID, primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("cached_tokens", sa.Integer, nullable=False),
        sa.Column("cache_write_5m_tokens", sa.Integer, nullable=False),
        sa.Column("cache_write_1h_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=False),
        sa.Column("ttft_ms", sa.Integer, nullable=True),
    )
    # Reports read one tenant (or key) over a time range: these make that a range scan.
    op.create_index("ix_usage_tenant_time", "usage_events", ["tenant_id", "started_at"])
    op.create_index("ix_usage_key_time", "usage_events", ["key_id", "started_at"])
    op.create_index("ix_usage_time", "usage_events", ["started_at"])

    now = datetime.now(timezone.utc)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # stored as naive UTC text, as the models do
    op.bulk_insert(plans, [{**DEFAULT_PLAN, "created_at": now}])


def downgrade() -> None:
    op.drop_table("usage_events")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("plans")
