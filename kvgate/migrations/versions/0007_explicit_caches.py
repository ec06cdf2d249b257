"""Explicit caches (``/v1/caches``) and their storage price.

- explicit_caches: one row per cache a tenant created (its prefix as the template's
  messages and tools, token count, expiry, deletion).
- plans: ``cache_storage_price`` (per million token-hours of an explicit cache's pinned
  tokens); existing plans get the derived price (1× their input price).
- usage_events: ``stored_token_seconds`` (storage rows).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("plans", sa.Column("cache_storage_price", sa.BigInteger, nullable=False,
                                     server_default="0"))
    op.execute("UPDATE plans SET cache_storage_price = input_price")
    op.add_column("usage_events", sa.Column("stored_token_seconds", sa.BigInteger,
                                            nullable=False, server_default="0"))
    op.create_table(
        "explicit_caches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_explicit_caches_tenant", "explicit_caches",
                    ["tenant_id", "deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_explicit_caches_tenant", table_name="explicit_caches")
    op.drop_table("explicit_caches")
    op.drop_column("usage_events", "stored_token_seconds")
    op.drop_column("plans", "cache_storage_price")
