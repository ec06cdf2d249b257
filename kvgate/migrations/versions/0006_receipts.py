"""Signed billing receipts: one per billed request that names one, written with its usage
row; read by its tenant through ``GET /v1/receipts/{id}``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "receipts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_receipts_tenant_id", "receipts", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_receipts_tenant_id", table_name="receipts")
    op.drop_table("receipts")
