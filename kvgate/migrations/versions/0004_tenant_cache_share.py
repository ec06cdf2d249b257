"""Tenants may have a guaranteed cache share (bytes on each tier); null, the default and
what existing tenants get, means the fair share.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("cache_share_bytes", sa.BigInteger, nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+): copying the table, as batch mode would, is refused
    # while other tables refer to it with foreign keys on.
    op.drop_column("tenants", "cache_share_bytes")
