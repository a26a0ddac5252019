"""Each ledger row may carry the confidence signal that scored its answer and the
score, a judge's row the attempt it graded, each row the kinds of personal
data its prompt held, and how its step's start tier was chosen (tier: auto);
and people's feedback on a step's answer, which the router counts.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.add_column(sa.Column("signal", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("judged", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("personal", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("routed", sa.String(length=12), nullable=True))
        batch_op.add_column(sa.Column("expected_pass", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("route_key", sa.String(length=16), nullable=True))
        batch_op.create_index("ix_model_calls_route", ["workflow", "step_id", "route_key"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("step_id", sa.String(length=100), nullable=False),
        sa.Column("good", sa.Boolean(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_feedback_run_id_step_id", "feedback", ["run_id", "step_id"])


def downgrade() -> None:
    op.drop_index("ix_feedback_run_id_step_id", table_name="feedback")
    op.drop_table("feedback")
    with op.batch_alter_table("model_calls", schema=None) as batch_op:
        batch_op.drop_index("ix_model_calls_route")
        batch_op.drop_column("route_key")
        batch_op.drop_column("expected_pass")
        batch_op.drop_column("routed")
        batch_op.drop_column("personal")
        batch_op.drop_column("judged")
        batch_op.drop_column("confidence")
        batch_op.drop_column("signal")
