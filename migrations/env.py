"""Alembic environment: runs on a connection tierflow hands over, or on the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from orchestrator.store.tables import metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from orchestrator.settings import load_settings

    engine = create_engine(load_settings().database_url)
    with engine.begin() as fresh:
        _run(fresh)
