"""A ledger row says whether a stand-in for a real model served it (a tier
marked simulated): spend reports sum that cost apart and say so. The spend
index holds the mark, so a report still reads the index alone.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ix_model_calls_spend as migration 0009 made it.
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
    "local",
    "eval",
]


def upgrade() -> None:
    op.drop_index("ix_model_calls_spend", table_name="model_calls")
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("simulated", sa.Boolean(), nullable=True))
    op.create_index("ix_model_calls_spend", "model_calls", [*SPEND_COLUMNS, "simulated"])


def downgrade() -> None:
    op.drop_index("ix_model_calls_spend", table_name="model_calls")
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("simulated")
    op.create_index("ix_model_calls_spend", "model_calls", SPEND_COLUMNS)
