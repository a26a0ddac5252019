"""Writes and reads of runs, steps and ledger rows. The engine is handed in."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from orchestrator.ledger import Call, StepRecord
from orchestrator.store.tables import model_calls, runs, step_runs

CALL_FIELDS = tuple(field.name for field in fields(Call))
_INSERT_STEP = insert(step_runs)
_INSERT_CALL = insert(model_calls)


def now() -> datetime:
    return datetime.now(UTC)


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_run(
        self,
        *,
        run_id: str,
        workflow: str,
        version: str | None,
        content_hash: str,
        inputs: dict[str, Any],
        status: str = "running",
    ) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(runs).values(
                    id=run_id,
                    workflow=workflow,
                    workflow_version=version,
                    workflow_hash=content_hash,
                    status=status,
                    inputs=inputs,
                    created_at=now(),
                )
            )

    def record_step(
        self, *, run_id: str, workflow: str, content_hash: str, record: StepRecord
    ) -> None:
        """The step's result and all its ledger rows, in one transaction."""
        answer = record.answer
        step_row = {
            "run_id": run_id,
            "step_id": record.step_id,
            "status": record.status,
            "output": record.output,
            "error": record.error,
            "tier_asked": record.tier_asked,
            "tier_used": answer.tier_used if answer else None,
            "model": answer.model if answer else None,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
        }
        call_rows = [
            {
                "run_id": run_id,
                "step_id": record.step_id,
                "workflow": workflow,
                "workflow_hash": content_hash,
                "agent": record.agent,
                "day": call.created_at.astimezone(UTC).date(),
                **{name: getattr(call, name) for name in CALL_FIELDS},
            }
            for call in record.calls
        ]
        # Plain insert() with parameters, not .values(): the compiled statement
        # is cached, which matters on the per-step hot path.
        with self.engine.begin() as connection:
            connection.execute(_INSERT_STEP, step_row)
            if call_rows:
                connection.execute(_INSERT_CALL, call_rows)

    def finish_run(
        self, run_id: str, *, status: str, outputs: Any = None, error: str | None = None
    ) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(status=status, outputs=outputs, error=error, finished_at=now())
            )

    def run(self, run_id: str) -> dict[str, Any] | None:
        """The run with its steps and calls, or None. A unique id prefix is accepted."""
        with self.engine.connect() as connection:
            row = connection.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
            if row is None and len(run_id) >= 4:
                matches = (
                    connection.execute(
                        select(runs).where(runs.c.id.startswith(run_id, autoescape=True)).limit(2)
                    )
                    .mappings()
                    .all()
                )
                row = matches[0] if len(matches) == 1 else None
            if row is None:
                return None
            steps = (
                connection.execute(
                    select(step_runs)
                    .where(step_runs.c.run_id == row["id"])
                    .order_by(step_runs.c.started_at, step_runs.c.id)
                )
                .mappings()
                .all()
            )
            calls = (
                connection.execute(
                    select(model_calls)
                    .where(model_calls.c.run_id == row["id"])
                    .order_by(model_calls.c.id)
                )
                .mappings()
                .all()
            )
        return {**row, "steps": [dict(s) for s in steps], "calls": [dict(c) for c in calls]}

    def runs(
        self, *, workflow: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        query = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
        if workflow:
            query = query.where(runs.c.workflow == workflow)
        if status:
            query = query.where(runs.c.status == status)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]
