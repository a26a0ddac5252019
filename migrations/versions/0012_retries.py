"""A retry is a new run linked to the run it retries, and starts with that
run's finished steps copied in, each saying where it came from.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_of", sa.String(length=32), nullable=True))
    with op.batch_alter_table("step_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reused_from", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("step_runs", schema=None) as batch_op:
        batch_op.drop_column("reused_from")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("retry_of")
