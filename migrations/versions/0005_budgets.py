"""Budgets: each ledger row keeps the reservation it held; counters per budget scope.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reserved_usd", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("local", sa.Boolean(), nullable=True))
    op.create_table(
        "budget_usage",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("spent_usd", sa.BigInteger(), nullable=False),
        sa.Column("reserved_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_budget_usage")),
    )


def downgrade() -> None:
    op.drop_table("budget_usage")
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("local")
        batch_op.drop_column("reserved_usd")
