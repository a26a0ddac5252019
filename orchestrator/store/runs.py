"""Runs and their leases: create, lease, hand off, cancel, finish, and read back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from orchestrator.errors import UserError
from orchestrator.store import prepared
from orchestrator.store.calls import abandon
from orchestrator.store.clock import db_now_s
from orchestrator.store.leases import Lease, fence
from orchestrator.store.tables import model_calls, runs, step_runs, tool_calls, traces

ACTIVE = ("queued", "running")
WAITING = "waiting"  # for a person's decision on an approval step: no lease held
UNENDED = (*ACTIVE, WAITING)
STATUSES = (*UNENDED, "succeeded", "failed", "cancelled")
# Bound values, not an expanding IN: a statement built once holds them (store.prepared).
_IS_ACTIVE = runs.c.status.in_([literal(status) for status in ACTIVE])
# The end of a run, built once (see leases._FENCE): a run that already ended
# (a cancel during its last step) keeps its status; the lease goes either way.
_FINISH = (
    update(runs)
    .where(runs.c.id == bindparam("e_run_id"))
    .values(
        status=case((_IS_ACTIVE, bindparam("e_status")), else_=runs.c.status),
        outputs=case(
            (_IS_ACTIVE, bindparam("e_outputs", type_=runs.c.outputs.type)),
            else_=runs.c.outputs,
        ),
        error=case(
            (_IS_ACTIVE, bindparam("e_error", type_=runs.c.error.type)),
            else_=runs.c.error,
        ),
        finished_at=case(
            (_IS_ACTIVE, bindparam("e_at", type_=runs.c.finished_at.type)),
            else_=runs.c.finished_at,
        ),
        lease_owner=None,
        lease_expires_s=None,
    )
    .returning(runs.c.status)
)

_CREATE = insert(runs)
# The creator's lease expires by the database's clock, as every renewal does.
_CREATE_LEASED = insert(runs).values(
    lease_expires_s=db_now_s() + bindparam("c_ttl_s", type_=runs.c.lease_expires_s.type)
)


_REUSABLE = ("succeeded", "skipped")
# A retry's first step rows: the finished steps it reuses, as the retried run left them.
_COPIED = ("step_id", "status", "output", "tier_asked", "tier_used", "model", "started_at")
_COPY_STEPS = insert(step_runs).from_select(
    ["run_id", *_COPIED, "finished_at", "reused_from"],
    select(
        bindparam("new_run_id", type_=step_runs.c.run_id.type),
        *(step_runs.c[name] for name in _COPIED),
        step_runs.c.finished_at,
        bindparam("old_run_id", type_=step_runs.c.run_id.type),
    ).where(
        step_runs.c.run_id == bindparam("old_run_id"),
        step_runs.c.step_id.in_(bindparam("steps", expanding=True)),
        step_runs.c.status.in_(_REUSABLE),
    ),
)


def now() -> datetime:
    return datetime.now(UTC)


def _stale() -> Any:
    """A lease nobody holds, or one that has expired by the database's clock."""
    return or_(runs.c.lease_owner.is_(None), runs.c.lease_expires_s < db_now_s())


# Only a queued or running run is leased, and only if its lease is free or the
# caller's; the token grows with every acquisition.
_ACQUIRE = (
    update(runs)
    .where(
        runs.c.id == bindparam("a_run_id"),
        _IS_ACTIVE,
        or_(_stale(), runs.c.lease_owner == bindparam("a_owner")),
    )
    .values(
        status="running",
        lease_owner=bindparam("a_owner"),
        lease_token=runs.c.lease_token + 1,
        lease_expires_s=db_now_s() + bindparam("a_ttl_s", type_=Float()),
    )
    .returning(runs.c.lease_token)
)


class RunStore:
    engine: Engine

    def create_run(
        self,
        *,
        run_id: str,
        workflow: str,
        version: str | None,
        content_hash: str,
        inputs: dict[str, Any],
        path: str | None = None,
        status: str = "running",
        lease_owner: str | None = None,
        lease_ttl_s: float = 0.0,
        queue: str | None = None,
        time_limit_s: float | None = None,
        eval: bool = False,
        retry_of: str | None = None,
        reuse: Sequence[str] = (),
        tags: dict[str, str] | None = None,
    ) -> Lease | None:
        """Record a new run; with ``lease_owner`` the creator holds its lease from
        the start, and gets it back. ``queue`` is where its message is about to go.
        ``eval`` marks a run of ``tierflow eval``. A retry of run ``retry_of``
        starts with that run's steps ``reuse`` copied in (those that succeeded
        or were skipped there), in the same transaction."""
        moment = now()
        leased = lease_owner is not None
        with self.engine.begin() as connection:
            prepared.execute(
                connection,
                _CREATE_LEASED if leased else _CREATE,
                {
                    "id": run_id,
                    "workflow": workflow,
                    "workflow_version": version,
                    "workflow_hash": content_hash,
                    "workflow_path": path,
                    "status": status,
                    "inputs": inputs,
                    "created_at": moment,
                    "lease_owner": lease_owner,
                    "lease_token": 1 if leased else 0,
                    **({"c_ttl_s": lease_ttl_s} if leased else {}),
                    "queue": queue,
                    "enqueued_at": moment if queue else None,
                    "time_limit_s": time_limit_s,
                    "eval": True if eval else None,
                    "retry_of": retry_of,
                    "tags": tags or None,
                },
            )
            if retry_of is not None and reuse:
                connection.execute(
                    _COPY_STEPS, {"new_run_id": run_id, "old_run_id": retry_of, "steps": reuse}
                )
        return Lease(run_id, lease_owner, 1) if lease_owner is not None else None

    def finished_steps(self, run_id: str) -> list[str]:
        """The steps of ``run_id`` that succeeded or were skipped: what a retry may reuse."""
        query = (
            select(step_runs.c.step_id)
            .where(step_runs.c.run_id == run_id, step_runs.c.status.in_(_REUSABLE))
            .order_by(step_runs.c.id)
        )
        with self.engine.connect() as connection:
            return [row[0] for row in connection.execute(query)]

    def acquire_lease(self, run_id: str, *, owner: str, ttl_s: float) -> Lease | None:
        """Take the run's lease unless a live lease belongs to someone else.

        Each acquisition gets a token one higher than the last, which fences
        off every write of earlier holders. Only queued or running runs can be
        leased, so a finished run never runs again.
        """
        params = {"a_run_id": run_id, "a_owner": owner, "a_ttl_s": ttl_s}
        with self.engine.begin() as connection:
            taken = prepared.execute(connection, _ACQUIRE, params).fetchone()
        return None if taken is None else Lease(run_id, owner, int(taken[0]))

    def renew_lease(self, lease: Lease, *, ttl_s: float) -> str | None:
        """Extend ``lease``; returns the run's status, or None if the lease is lost."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(runs)
                .where(runs.c.id == lease.run_id, runs.c.lease_token == lease.token)
                .values(lease_expires_s=db_now_s() + ttl_s)
            )
            if result.rowcount != 1:
                return None
            return connection.execute(
                select(runs.c.status).where(runs.c.id == lease.run_id)
            ).scalar()

    def status_of(self, run_id: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()

    def cancel_run(self, run_id: str) -> str | None:
        """Cancel a queued, running or waiting run; returns its status afterwards, or None if unknown.

        A queued run is never picked up; a running one is stopped by its
        executor, which records the calls it cuts off. When no live executor
        holds the run, its pending calls are abandoned here, so no reservation
        outlives the run.
        """
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.in_(UNENDED))
                .values(status="cancelled", finished_at=now(), waiting_until=None)
            )
            orphaned = connection.execute(
                select(runs.c.id).where(runs.c.id == run_id, _stale())
            ).first()
            if orphaned is not None:
                abandon(connection, "its run was cancelled", run_id=run_id)
            status = connection.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
            if status == "cancelled":
                claim_no_savings(connection, run_id)
            return status

    def hand_off(self, lease: Lease, *, queue: str) -> bool:
        """Queue a running run again, for ``queue``'s workers, dropping ``lease``.

        False if it was cancelled meanwhile; ``LeaseLost`` if the lease is not its own.
        """
        with self.engine.begin() as connection:
            fence(connection, lease)
            moved = connection.execute(
                update(runs)
                .where(runs.c.id == lease.run_id, runs.c.status == "running")
                .values(
                    status="queued",
                    lease_owner=None,
                    lease_expires_s=None,
                    queue=queue,
                    enqueued_at=now(),
                )
            )
            return moved.rowcount == 1

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        outputs: Any = None,
        error: str | None = None,
        lease: Lease | None = None,
    ) -> str | None:
        """Record the run's end, drop its lease, and abandon any call still pending.

        With ``lease``, only while it is the run's (else ``LeaseLost``). A run
        that was cancelled (or already ended) keeps that status: a cancel during
        the last step never turns into success. Returns the run's status after.
        """
        with self.engine.begin() as connection:
            fence(connection, lease)
            params = {
                "e_run_id": run_id,
                "e_status": status,
                "e_outputs": outputs,
                "e_error": error,
                "e_at": now(),
            }
            ended = prepared.execute(connection, _FINISH, params).fetchone()
            abandon(connection, f"its run ended ({status})", run_id=run_id)
            final = None if ended is None else str(ended[0])
            if final is not None and final != "succeeded":
                claim_no_savings(connection, run_id)
            return final

    def abandon_orphans(self) -> int:
        """Abandon pending calls of ended runs that no live executor holds; how many runs.

        A run cancelled while its executor was alive leaves them to it; if
        that executor died before it could, a sweeper ends them here.
        """
        with self.engine.begin() as connection:
            orphans = connection.execute(
                select(runs.c.id)
                .where(runs.c.status.not_in(ACTIVE), _stale())
                .where(
                    runs.c.id.in_(
                        select(model_calls.c.run_id).where(model_calls.c.state == "pending")
                    )
                )
            ).all()
            for (run_id,) in orphans:
                abandon(connection, "its run had ended", run_id=run_id)
        return len(orphans)

    def runs_to_publish(self, *, lease_ttl_s: float, queued_for_s: float) -> list[dict[str, Any]]:
        """Runs whose message may be lost, each claimed for publishing once more.

        They are running runs whose lease went stale (their executor died), and
        queued runs waiting for longer than ``queued_for_s`` (a broker that
        restarted empty). A run is claimed by moving its ``enqueued_at`` to now,
        so concurrent sweepers publish it once, and a long backlog gets at most
        one extra message per run per period.
        """
        moment = now()
        published = func.coalesce(runs.c.enqueued_at, runs.c.created_at)
        query = select(
            runs.c.id,
            runs.c.workflow,
            runs.c.status,
            runs.c.enqueued_at,
            runs.c.queue,
            runs.c.time_limit_s,
        ).where(
            or_(
                and_(
                    runs.c.status == "running",
                    _stale(),
                    published < moment - timedelta(seconds=lease_ttl_s),
                ),
                and_(
                    runs.c.status == "queued",
                    published < moment - timedelta(seconds=queued_for_s),
                ),
            )
        )
        claimed = []
        with self.engine.begin() as connection:
            for row in connection.execute(query).mappings().all():
                before = runs.c.enqueued_at
                unchanged = (
                    before.is_(None) if row["enqueued_at"] is None else before == row["enqueued_at"]
                )
                taken = connection.execute(
                    update(runs)
                    .where(runs.c.id == row["id"], runs.c.status == row["status"], unchanged)
                    .values(enqueued_at=moment)
                )
                if taken.rowcount == 1:
                    claimed.append(dict(row))
        return claimed

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        """The run's own row (no steps or calls), or None."""
        with self.engine.connect() as connection:
            row = connection.execute(_RUN_ROW, {"r_run_id": run_id})
            found = row.mappings().first()
        return None if found is None else dict(found)

    def find_run_id(self, run_id: str) -> str | None:
        """The id of the run ``run_id`` names, whole or as a unique prefix of 4 or more."""
        with self.engine.connect() as connection:
            exact = connection.execute(select(runs.c.id).where(runs.c.id == run_id)).scalar()
            if exact is not None or len(run_id) < 4:
                return exact
            matches = connection.execute(
                select(runs.c.id).where(runs.c.id.startswith(run_id, autoescape=True)).limit(2)
            ).all()
        return matches[0][0] if len(matches) == 1 else None

    def named_run_id(self, run_id: str) -> str:
        """``find_run_id``, or a ``UserError`` saying why no run matches."""
        found = self.find_run_id(run_id)
        if found is not None:
            return found
        if len(run_id) >= 4:
            with self.engine.connect() as connection:
                several = connection.execute(
                    select(runs.c.id).where(runs.c.id.startswith(run_id, autoescape=True)).limit(2)
                ).all()
            if len(several) > 1:
                raise UserError(f"run id prefix {run_id!r} names several runs: give more of it")
            raise UserError(f"no run {run_id!r}")
        raise UserError(f"no run {run_id!r} (a run id prefix takes at least 4 characters)")

    def named_run(self, run_id: str) -> dict[str, Any]:
        """The run's row (``run_row``), named whole or by a unique prefix; else ``UserError``."""
        row = self.run_row(self.named_run_id(run_id))
        if row is None:
            raise UserError(f"no run {run_id!r}")  # deleted in between
        return row

    def run(self, run_id: str) -> dict[str, Any] | None:
        """The run with its steps and calls, or None. A unique id prefix is accepted."""
        found_id = self.find_run_id(run_id)
        if found_id is None:
            return None
        with self.engine.connect() as connection:
            row = (
                connection.execute(_with_stale(select(runs)).where(runs.c.id == found_id))
                .mappings()
                .first()
            )
            if row is None:
                return None
            parts = {
                name: [
                    dict(found)
                    for found in connection.execute(
                        select(table).where(table.c.run_id == found_id).order_by(*order)
                    ).mappings()
                ]
                for name, table, order in (
                    ("steps", step_runs, (step_runs.c.started_at, step_runs.c.id)),
                    ("calls", model_calls, (model_calls.c.id,)),
                    ("tools", tool_calls, (tool_calls.c.id,)),
                    ("traces", traces, (traces.c.id,)),
                )
            }
        return {**row, **parts}

    def runs(
        self, *, workflow: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recent runs, newest first. ``stale`` marks a running run nobody executes."""
        query = _with_stale(select(runs)).order_by(runs.c.created_at.desc()).limit(limit)
        if workflow:
            query = query.where(runs.c.workflow == workflow)
        if checked_status(status):
            query = query.where(runs.c.status == status)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]


def checked_status(status: str | None) -> str | None:
    """``status`` if it is one a run can have (or None); else ``UserError``."""
    if status is not None and status not in STATUSES:
        raise UserError(f"status {status!r}: choose one of {', '.join(STATUSES)}")
    return status


def claim_no_savings(connection: Any, run_id: str) -> None:
    """A run that did not succeed claims no savings: each row's counterfactual is its cost."""
    connection.execute(
        update(model_calls)
        .where(model_calls.c.run_id == run_id)
        .values(reference_cost_usd=model_calls.c.cost_usd)
    )


def _with_stale(query: Any) -> Any:
    stale = and_(runs.c.status == "running", _stale())
    return query.add_columns(case((stale, True), else_=False).label("stale"))


# Built once: read for every run a worker executes.
_RUN_ROW = _with_stale(select(runs)).where(runs.c.id == bindparam("r_run_id"))
