"""Covering indexes for spend reports.

``ix_model_calls_spend`` holds every column a report sums, led by the columns
reports group by, so SQLite reads the index alone and in group order.
``ix_model_calls_escalated`` holds the escalated calls only: their reason is
free text, too long for a PostgreSQL index entry. ``ix_runs_versions`` maps a
workflow's content hash to the version it declared.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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


ESCALATED = "escalation_reason IS NOT NULL"


def upgrade() -> None:
    op.create_index("ix_model_calls_spend", "model_calls", SPEND_COLUMNS)
    op.create_index(
        "ix_model_calls_escalated",
        "model_calls",
        SPEND_COLUMNS[:7],
        sqlite_where=sa.text(ESCALATED),
        postgresql_where=sa.text(ESCALATED),
    )
    op.create_index("ix_runs_versions", "runs", ["workflow", "workflow_hash", "workflow_version"])


def downgrade() -> None:
    op.drop_index("ix_runs_versions", table_name="runs")
    op.drop_index("ix_model_calls_escalated", table_name="model_calls")
    op.drop_index("ix_model_calls_spend", table_name="model_calls")
