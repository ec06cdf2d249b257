"""Cache reservations instead of default shares, a third retention class, cache keys.

- plans: ``cache_write_24h_price`` (the 24-hour retention class) and
  ``cache_reservation_price`` (per GiB-hour of reserved capacity); existing plans get the
  derived prices (3× and 1× their input price).
- tenants: ``cache_reserved_device_bytes`` / ``cache_reserved_host_bytes`` replace
  ``cache_share_bytes`` (a tenant that had an explicit share keeps it as a reservation on
  both tiers; the fair share of every active tenant is no longer the default), and
  ``cache_max_ttl_seconds``, the longest TTL its requests may ask for (default 24 hours).
- usage_events: ``cache_write_24h_tokens``, ``reserved_byte_seconds`` (reservation rows)
  and ``cache_key`` (the request's prompt_cache_key).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("plans", sa.Column("cache_write_24h_price", sa.BigInteger, nullable=False,
                                     server_default="0"))
    op.add_column("plans", sa.Column("cache_reservation_price", sa.BigInteger, nullable=False,
                                     server_default="0"))
    op.execute("UPDATE plans SET cache_write_24h_price = input_price * 3, "
               "cache_reservation_price = input_price")
    op.add_column("tenants", sa.Column("cache_reserved_device_bytes", sa.BigInteger,
                                       nullable=True))
    op.add_column("tenants", sa.Column("cache_reserved_host_bytes", sa.BigInteger,
                                       nullable=True))
    op.add_column("tenants", sa.Column("cache_max_ttl_seconds", sa.Integer, nullable=False,
                                       server_default="86400"))
    op.execute("UPDATE tenants SET cache_reserved_device_bytes = cache_share_bytes, "
               "cache_reserved_host_bytes = cache_share_bytes")
    # A plain DROP COLUMN (SQLite 3.35+), as in 0004's downgrade.
    op.drop_column("tenants", "cache_share_bytes")
    op.add_column("usage_events", sa.Column("cache_write_24h_tokens", sa.Integer,
                                            nullable=False, server_default="0"))
    op.add_column("usage_events", sa.Column("reserved_byte_seconds", sa.BigInteger,
                                            nullable=False, server_default="0"))
    op.add_column("usage_events", sa.Column("cache_key", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("usage_events", "cache_key")
    op.drop_column("usage_events", "reserved_byte_seconds")
    op.drop_column("usage_events", "cache_write_24h_tokens")
    op.add_column("tenants", sa.Column("cache_share_bytes", sa.BigInteger, nullable=True))
    op.execute("UPDATE tenants SET cache_share_bytes = cache_reserved_device_bytes")
    op.drop_column("tenants", "cache_max_ttl_seconds")
    op.drop_column("tenants", "cache_reserved_host_bytes")
    op.drop_column("tenants", "cache_reserved_device_bytes")
    op.drop_column("plans", "cache_reservation_price")
    op.drop_column("plans", "cache_write_24h_price")
