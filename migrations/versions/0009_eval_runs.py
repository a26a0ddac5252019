"""Runs made by ``tierflow eval``, and their ledger rows, are marked: spend
reports leave them out unless asked. The spend indexes hold the mark, so a
report still reads them alone. A ledger row keeps its raw confidence score
when its step's labels calibrated it. A label keeps the tier of the answer it
labels, and a step's labels are indexed newest first, for the router.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ix_model_calls_spend as migration 0005 made it.
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
]
ESCALATED = "escalation_reason IS NOT NULL"


def _spend_indexes(extra: list[str]) -> None:
    op.create_index("ix_model_calls_spend", "model_calls", [*SPEND_COLUMNS, *extra])
    op.create_index(
        "ix_model_calls_escalated",
        "model_calls",
        [*SPEND_COLUMNS[:7], *extra],
        sqlite_where=sa.text(ESCALATED),
        postgresql_where=sa.text(ESCALATED),
    )


def _drop_spend_indexes() -> None:
    op.drop_index("ix_model_calls_escalated", table_name="model_calls")
    op.drop_index("ix_model_calls_spend", table_name="model_calls")


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("eval", sa.Boolean(), nullable=True))
    _drop_spend_indexes()
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("eval", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("raw_confidence", sa.Float(), nullable=True))
    _spend_indexes(["eval"])
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tier", sa.String(length=50), nullable=True))
        batch_op.create_index("ix_feedback_step_id_id", ["step_id", "id"])
    op.execute(
        "UPDATE feedback SET tier = (SELECT tier_used FROM step_runs"
        " WHERE step_runs.run_id = feedback.run_id AND step_runs.step_id = feedback.step_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_step_id_id")
        batch_op.drop_column("tier")
    _drop_spend_indexes()
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_column("raw_confidence")
        batch_op.drop_column("eval")
    _spend_indexes([])
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("eval")
