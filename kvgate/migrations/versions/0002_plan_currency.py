"""Plans state the currency of their prices (ISO 4217 code), and each usage row the
currency it was billed in; existing plans and rows are USD.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The server default fills the rows already there, and any INSERT that names no currency.
    op.add_column("plans", sa.Column("currency", sa.String(3), nullable=False,
                                     server_default="USD"))
    op.add_column("usage_events", sa.Column("currency", sa.String(3), nullable=False,
                                            server_default="USD"))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+): copying the table, as batch mode would, is refused
    # while tenants refer to it with foreign keys on.
    op.drop_column("usage_events", "currency")
    op.drop_column("plans", "currency")
