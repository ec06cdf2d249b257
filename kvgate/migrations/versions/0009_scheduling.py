"""Tenant-fair scheduling: weights per plan, priorities and running caps per tenant.

- plans: ``scheduling_weight`` (1 to 1000, default 1): the plan's tenants' share of the
  engine while tenants contend for it, relative to weight 1.
- tenants: ``min_priority`` (-1000 to 1000, default 0): the lowest request ``priority``
  its requests may ask for (lower runs first), and ``max_running_sequences`` (null: no
  cap of its own; else at least 1): how many of its sequences may run at once.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Column constraints, so SQLite's ADD COLUMN takes them too (it cannot add a
    # table constraint to an existing table).
    op.add_column("plans", sa.Column(
        "scheduling_weight", sa.Integer,
        sa.CheckConstraint("scheduling_weight >= 1 AND scheduling_weight <= 1000",
                           name="ck_plans_scheduling_weight"),
        nullable=False, server_default="1"))
    op.add_column("tenants", sa.Column(
        "min_priority", sa.Integer,
        sa.CheckConstraint("min_priority >= -1000 AND min_priority <= 1000",
                           name="ck_tenants_min_priority"),
        nullable=False, server_default="0"))
    op.add_column("tenants", sa.Column(
        "max_running_sequences", sa.Integer,
        sa.CheckConstraint("max_running_sequences >= 1",
                           name="ck_tenants_max_running_sequences"),
        nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite 3.35+), as in 0004's downgrade; on PostgreSQL it drops
    # the column's constraint with it.
    op.drop_column("tenants", "max_running_sequences")
    op.drop_column("tenants", "min_priority")
    op.drop_column("plans", "scheduling_weight")
