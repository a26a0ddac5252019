"""Approval steps: a run waits for a person, holding no lease; their decision
sends it back to be executed (approved) or ends it (rejected)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.errors import UserError
from orchestrator.store.leases import Lease, fence
from orchestrator.store.runs import WAITING, claim_no_savings, now
from orchestrator.store.tables import approvals, runs, step_runs


class ApprovalStore:
    engine: Engine

    def decision(self, run_id: str, step_id: str) -> dict[str, Any] | None:
        """The decision on ``step_id`` of ``run_id``, as the step's output gives it; or None."""
        query = select(
            approvals.c.approved, approvals.c.note, approvals.c.decided_by, approvals.c.decided_at
        ).where(approvals.c.run_id == run_id, approvals.c.step_id == step_id)
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        approved, note, by, at = row
        return {"approved": approved, "note": note, "by": by, "at": _aware(at).isoformat()}

    def wait(self, lease: Lease, *, until: datetime | None) -> bool:
        """The running run waits for a decision, dropping ``lease``: False if it was
        cancelled meanwhile, ``LeaseLost`` if the lease is not its own."""
        with self.engine.begin() as connection:
            fence(connection, lease)
            moved = connection.execute(
                update(runs)
                .where(runs.c.id == lease.run_id, runs.c.status == "running")
                .values(status=WAITING, lease_owner=None, lease_expires_s=None, waiting_until=until)
            )
            return moved.rowcount == 1

    def decide(
        self, run_id: str, step_id: str, *, approved: bool, note: str | None, by: str
    ) -> str:
        """Record a person's decision on a waiting step; the run's status after it:
        ``queued`` to be executed again (approved), or ``failed`` (rejected, or
        nobody decided within the step's timeout). ``UserError`` if the run or
        step is not waiting, or was decided already."""
        moment = now()
        with self.engine.begin() as connection:
            row = connection.execute(
                select(runs.c.status, runs.c.waiting_until).where(runs.c.id == run_id)
            ).first()
            if row is None:
                raise UserError(f"no run {run_id!r}")
            decided = connection.execute(
                select(approvals.c.approved, approvals.c.decided_by, approvals.c.decided_at).where(
                    approvals.c.run_id == run_id, approvals.c.step_id == step_id
                )
            ).first()
            if decided is not None:
                verb = "approved" if decided[0] else "rejected"
                raise UserError(
                    f"step {step_id} of run {run_id} was {verb} already,"
                    f" by {decided[1]} at {decided[2].isoformat(timespec='seconds')}"
                )
            status, until = row
            if status != WAITING:
                raise UserError(f"run {run_id} is {status}, not waiting for an approval")
            waiting = [
                found
                for (found,) in connection.execute(
                    select(step_runs.c.step_id).where(
                        step_runs.c.run_id == run_id, step_runs.c.status == WAITING
                    )
                )
            ]
            if step_id not in waiting:
                raise UserError(
                    f"step {step_id!r} of run {run_id} is not waiting for an approval;"
                    f" {', '.join(waiting) or 'none'} is"
                )
            if until is not None and _aware(until) <= moment:
                _end(connection, run_id, f"nobody decided on step {step_id} within its timeout_s")
                status = "failed"
        if status == "failed":
            raise UserError(f"run {run_id} waited past its step's timeout_s and has failed")
        try:
            return self._record(run_id, step_id, approved=approved, note=note, by=by, at=moment)
        except IntegrityError:  # another decision on the same step came first
            raise UserError(f"step {step_id} of run {run_id} was decided already") from None

    def _record(
        self, run_id: str, step_id: str, *, approved: bool, note: str | None, by: str, at: datetime
    ) -> str:
        moment = at
        with self.engine.begin() as connection:
            connection.execute(
                insert(approvals).values(
                    run_id=run_id,
                    step_id=step_id,
                    approved=approved,
                    note=note,
                    decided_by=by,
                    decided_at=moment,
                )
            )
            if approved:
                moved = connection.execute(
                    update(runs)
                    .where(runs.c.id == run_id, runs.c.status == WAITING)
                    .values(status="queued", waiting_until=None, enqueued_at=moment)
                )
            else:
                said = f"step {step_id} was rejected by {by}" + (f": {note}" if note else "")
                connection.execute(
                    update(step_runs)
                    .where(step_runs.c.run_id == run_id, step_runs.c.step_id == step_id)
                    .values(status="failed", error=said, finished_at=moment)
                )
                moved = _end(connection, run_id, said)
            if moved.rowcount != 1:  # another decision or a cancel came first: roll back
                raise UserError(f"run {run_id} is no longer waiting: try tierflow show")
        return "queued" if approved else "failed"

    def expire_waiting(self) -> list[str]:
        """Fail the waiting runs whose time for a decision has passed; their ids."""
        moment = now()
        with self.engine.begin() as connection:
            late = [
                run_id
                for (run_id,) in connection.execute(
                    select(runs.c.id).where(runs.c.status == WAITING, runs.c.waiting_until < moment)
                )
            ]
            for run_id in late:
                _end(connection, run_id, "nobody decided on its approval step within timeout_s")
        return late


def _end(connection: Any, run_id: str, error: str) -> Any:
    ended = connection.execute(
        update(runs)
        .where(runs.c.id == run_id, runs.c.status == WAITING)
        .values(status="failed", error=error, finished_at=now(), waiting_until=None)
    )
    claim_no_savings(connection, run_id)
    return ended


def _aware(moment: datetime) -> datetime:
    """SQLite gives naive datetimes back: they are UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
