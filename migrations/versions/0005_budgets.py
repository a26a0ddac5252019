"""Budgets: each ledger row keeps the reservation it held, and whether a local tier
served it (the spend index covers that too); counters per budget scope.

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

# ix_model_calls_spend as migration 0004 made it.
SPEND_COLUMNS = [
    "workflow",
    "workflow_hash",
    "step_id",
    "tier_used",
    "model",
    "day",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "reference_cost_usd",
]


def upgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reserved_usd", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("local", sa.Boolean(), nullable=True))
    op.drop_index("ix_model_calls_spend", table_name="model_calls")
    op.create_index("ix_model_calls_spend", "model_calls", [*SPEND_COLUMNS, "local"])
    op.create_table(
        "budget_usage",
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("spent_usd", sa.BigInteger(), nullable=False),
        sa.Column("reserved_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_budget_usage")),
    )


def downgrade() -> None:
    op.drop_table("budget_usage")
    op.drop_index("ix_model_calls_spend", table_name="model_calls")
    op.create_index("ix_model_calls_spend", "model_calls", SPEND_COLUMNS)
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("local")
        batch_op.drop_column("reserved_usd")
