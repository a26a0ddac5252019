"""Leases carry a fencing token, and expire by the database's clock.

``lease_token`` grows on every acquisition; every write an executor makes
carries the token it acquired and is refused once it is stale.
``lease_expires_s`` is seconds since the epoch on the database's own clock, so
hosts whose clocks disagree still agree on which lease is stale. A hand-off
keeps where the step carries on in columns of its own.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_token", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("lease_expires_s", sa.Float(), nullable=True))
        batch_op.drop_column("lease_expires_at")
    with op.batch_alter_table("step_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("handoff_tier", sa.String(length=50), nullable=True))
        batch_op.add_column(sa.Column("handoff_used", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("handoff_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("step_runs", schema=None) as batch_op:
        batch_op.drop_column("handoff_reason")
        batch_op.drop_column("handoff_used")
        batch_op.drop_column("handoff_tier")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.drop_column("lease_expires_s")
        batch_op.drop_column("lease_token")
