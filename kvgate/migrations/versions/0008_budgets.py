"""Spend budgets per tenant and per API key, in micro-units of the tenant's plan currency
per UTC day and per UTC month; null, the default and what existing rows get, means no
budget.

- tenants: ``budget_daily_micros``, ``budget_monthly_micros``
- api_keys: ``budget_daily_micros``, ``budget_monthly_micros``

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TABLES = ("tenants", "api_keys")
_COLUMNS = ("budget_daily_micros", "budget_monthly_micros")


def upgrade() -> None:
    for table in _TABLES:
        for column in _COLUMNS:
            op.add_column(table, sa.Column(column, sa.BigInteger, nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+), as 0004: batch mode's table copy is refused while
    # other tables refer to these with foreign keys on.
    for table in _TABLES:
        for column in _COLUMNS:
            op.drop_column(table, column)
