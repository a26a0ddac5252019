"""Writes and reads of runs, steps and ledger rows. The engine is handed in."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from orchestrator.budgets import Limit, scope_keys
from orchestrator.ledger import Call, StepRecord
from orchestrator.store.tables import Money, budget_usage, model_calls, runs, step_runs

CALL_FIELDS = tuple(field.name for field in fields(Call))
_INSERT_STEP = insert(step_runs)
_INSERT_CALL = insert(model_calls)
_SETTLE_CALL = (
    update(model_calls)
    .where(
        model_calls.c.run_id == bindparam("b_run_id"),
        model_calls.c.step_id == bindparam("b_step_id"),
        model_calls.c.attempt == bindparam("b_attempt"),
        model_calls.c.state == "pending",
    )
    .values({name: bindparam(name) for name in (*CALL_FIELDS, "state")})
)


# Every call counts against the five scopes of budgets.scope_keys; a fixed list
# of parameters keeps the compiled statement cached.
_SCOPES = 5
_MOVE_BUDGET = (
    update(budget_usage)
    .where(budget_usage.c.key.in_([bindparam(f"key{i}") for i in range(_SCOPES)]))
    .values(
        reserved_usd=budget_usage.c.reserved_usd - bindparam("released", type_=Money),
        spent_usd=budget_usage.c.spent_usd + bindparam("spent", type_=Money),
    )
)


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
        path: str | None = None,
        status: str = "running",
        lease_owner: str | None = None,
        lease_ttl_s: float = 0.0,
        queue: str | None = None,
        time_limit_s: float | None = None,
    ) -> None:
        """Record a new run; with ``lease_owner`` the creator holds its lease from the start.

        ``queue`` is where the run's message is about to be published.
        """
        moment = now()
        with self.engine.begin() as connection:
            connection.execute(
                insert(runs).values(
                    id=run_id,
                    workflow=workflow,
                    workflow_version=version,
                    workflow_hash=content_hash,
                    workflow_path=path,
                    status=status,
                    inputs=inputs,
                    created_at=moment,
                    lease_owner=lease_owner,
                    lease_expires_at=moment + timedelta(seconds=lease_ttl_s)
                    if lease_owner
                    else None,
                    queue=queue,
                    enqueued_at=moment if queue else None,
                    time_limit_s=time_limit_s,
                )
            )

    def record_step(
        self, *, run_id: str, workflow: str, content_hash: str, record: StepRecord
    ) -> str | None:
        """The step's result and all its ledger rows, in one transaction.

        Returns the run's status as of that transaction, so the executor sees a
        cancellation before it starts another step.
        """
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
            self._call_row(run_id, workflow, content_hash, record, call) for call in record.calls
        ]
        # Plain insert()/update() with parameters, not .values(): the compiled
        # statement is cached, which matters on the per-step hot path.
        with self.engine.begin() as connection:
            connection.execute(_INSERT_STEP, step_row)
            for row, call in zip(call_rows, record.calls, strict=True):
                # The call's pending row (written before the request) is settled and
                # its reservation gives way to its cost; a call recorded without
                # one (refused by a budget, say) is inserted as it is.
                if connection.execute(_SETTLE_CALL, row).rowcount == 0:
                    columns = {key: value for key, value in row.items() if not key.startswith("b_")}
                    connection.execute(_INSERT_CALL, columns)
                elif call.reserved_usd is not None:
                    self._move_budget(
                        connection, row, released=call.reserved_usd, spent=call.cost_usd
                    )
            if record.status != "succeeded":
                # Calls cut off by a cancellation never settle; they may have been billed.
                self._abandon(
                    connection,
                    "cancelled mid-call",
                    model_calls.c.run_id == run_id,
                    model_calls.c.step_id == record.step_id,
                )
            return connection.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()

    @staticmethod
    def _move_budget(
        connection: Any, row: dict[str, Any], *, released: Decimal, spent: Decimal
    ) -> None:
        """Counters of every budget scope the call counts against: reservation out, cost in."""
        keys = scope_keys(row["run_id"], row["workflow"], row["day"])
        params = {f"key{i}": key for i, key in enumerate(keys)}
        connection.execute(_MOVE_BUDGET, {**params, "released": released, "spent": spent})

    def _abandon(self, connection: Any, why: str, *where: Any) -> None:
        """Pending calls become abandoned: they may have been billed, so their
        worst-case estimate moves from reserved to spent and stays there."""
        pending = connection.execute(
            select(
                model_calls.c.id,
                model_calls.c.run_id,
                model_calls.c.workflow,
                model_calls.c.day,
                model_calls.c.cost_usd,
                model_calls.c.reserved_usd,
            ).where(model_calls.c.state == "pending", *where)
        ).mappings()
        for row in pending.all():
            connection.execute(
                update(model_calls)
                .where(model_calls.c.id == row["id"])
                .values(state="abandoned", outcome="abandoned", error=why)
            )
            if row["reserved_usd"] is not None:
                cost = row["cost_usd"]
                self._move_budget(connection, row, released=cost, spent=cost)

    def open_call(
        self,
        *,
        run_id: str,
        workflow: str,
        content_hash: str,
        agent: str,
        step_id: str,
        call: Call,
        limits: list[Limit] | None = None,
    ) -> Limit | None:
        """Reserve a call's worst-case cost and write it pending, before its request.

        In one transaction, the call's cost is added to the reserved amount of
        every limit, each with a conditional UPDATE that fails if the limit
        would be passed, and the pending row is written. Returns the limit that
        refused the call (nothing is written then), or None.
        """
        row = {
            "run_id": run_id,
            "step_id": step_id,
            "workflow": workflow,
            "workflow_hash": content_hash,
            "agent": agent,
            "day": call.created_at.astimezone(UTC).date(),
            "state": "pending",
            **{name: getattr(call, name) for name in CALL_FIELDS},
        }
        with self.engine.connect() as connection, connection.begin() as transaction:
            for limit in limits or []:
                if not self._reserve(connection, limit, call.cost_usd):
                    transaction.rollback()
                    return limit
            connection.execute(_INSERT_CALL, row)
        return None

    def _reserve(self, connection: Any, limit: Limit, amount: Decimal) -> bool:
        counter = budget_usage.c
        if connection.execute(select(counter.key).where(counter.key == limit.key)).first() is None:
            # The first call in this scope and period: count what the ledger already holds.
            spent, reserved = _ledger_usage(connection, limit)
            connection.execute(
                _insert_ignoring_duplicates(connection, budget_usage).values(
                    key=limit.key, spent_usd=spent, reserved_usd=reserved
                )
            )
        fits = connection.execute(
            update(budget_usage)
            .where(
                counter.key == limit.key,
                or_(
                    literal(amount, Money) == 0,
                    counter.spent_usd + counter.reserved_usd + literal(amount, Money)
                    <= literal(limit.usd, Money),
                ),
            )
            .values(reserved_usd=counter.reserved_usd + literal(amount, Money))
        )
        return bool(fits.rowcount == 1)

    def budget_used(self, limit: Limit) -> tuple[Decimal, Decimal]:
        """(spent, reserved) in ``limit``'s scope: its counter, else the ledger's sums."""
        counter = budget_usage.c
        with self.engine.connect() as connection:
            found = connection.execute(
                select(counter.spent_usd, counter.reserved_usd).where(counter.key == limit.key)
            ).first()
            return (found[0], found[1]) if found else _ledger_usage(connection, limit)

    def usage(self, keys: list[str]) -> dict[str, tuple[Decimal, Decimal]]:
        """(spent, reserved) of the budget counters that exist among ``keys``."""
        counter = budget_usage.c
        query = select(counter.key, counter.spent_usd, counter.reserved_usd).where(
            counter.key.in_(keys)
        )
        with self.engine.connect() as connection:
            return {key: (spent, reserved) for key, spent, reserved in connection.execute(query)}

    @staticmethod
    def _call_row(
        run_id: str, workflow: str, content_hash: str, record: StepRecord, call: Call
    ) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "step_id": record.step_id,
            "workflow": workflow,
            "workflow_hash": content_hash,
            "agent": record.agent,
            "day": call.created_at.astimezone(UTC).date(),
            # A call that never reached its model (unavailable) released its reservation.
            "state": "released" if call.outcome == "unavailable" else "settled",
            "b_run_id": run_id,
            "b_step_id": record.step_id,
            "b_attempt": call.attempt,
            **{name: getattr(call, name) for name in CALL_FIELDS},
        }

    def acquire_lease(self, run_id: str, *, owner: str, ttl_s: float) -> bool:
        """Take (or renew) the run's lease unless a live lease belongs to someone else.

        Only queued or running runs can be leased, so a finished run never runs again.
        """
        moment = now()
        with self.engine.begin() as connection:
            result = connection.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.status.in_(("queued", "running")),
                    or_(
                        runs.c.lease_owner.is_(None),
                        runs.c.lease_owner == owner,
                        runs.c.lease_expires_at < moment,
                    ),
                )
                .values(
                    status="running",
                    lease_owner=owner,
                    lease_expires_at=moment + timedelta(seconds=ttl_s),
                )
            )
        return result.rowcount == 1

    def renew_lease(self, run_id: str, *, owner: str, ttl_s: float) -> str | None:
        """Extend ``owner``'s lease; returns the run's status, or None if the lease is lost."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.lease_owner == owner)
                .values(lease_expires_at=now() + timedelta(seconds=ttl_s))
            )
            if result.rowcount != 1:
                return None
            return connection.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()

    def cancel_run(self, run_id: str) -> str | None:
        """Cancel a queued or running run; returns its status afterwards, or None if unknown.

        A queued run is never picked up; a running one stops before its next step.
        """
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status.in_(("queued", "running")))
                .values(status="cancelled", finished_at=now())
            )
            return connection.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()

    def hand_off(self, run_id: str, *, owner: str, queue: str) -> bool:
        """Queue a running run again, for ``queue``'s workers, dropping ``owner``'s lease.

        False if ``owner`` no longer holds the run, or it was cancelled.
        """
        with self.engine.begin() as connection:
            moved = connection.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.lease_owner == owner, runs.c.status == "running")
                .values(
                    status="queued",
                    lease_owner=None,
                    lease_expires_at=None,
                    queue=queue,
                    enqueued_at=now(),
                )
            )
            return moved.rowcount == 1

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
            runs.c.id, runs.c.status, runs.c.enqueued_at, runs.c.queue, runs.c.time_limit_s
        ).where(
            or_(
                and_(
                    runs.c.status == "running",
                    runs.c.lease_expires_at < moment,
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

    def prepare_resume(
        self, run_id: str
    ) -> tuple[dict[str, Any], dict[str, int], dict[str, dict[str, Any]]]:
        """Finished steps' outputs, each step's last attempt, and where handed-off steps carry on.

        Call this holding the run's lease. Calls left pending by a dead process
        become abandoned (they may have been billed, so their estimate stays in
        the spend), and unfinished step records are cleared for their re-run.
        """
        with self.engine.begin() as connection:
            handed_on = dict(
                connection.execute(
                    select(step_runs.c.step_id, step_runs.c.output).where(
                        step_runs.c.run_id == run_id, step_runs.c.status == "handed_off"
                    )
                ).all()
            )
            self._abandon(connection, "its process died mid-call", model_calls.c.run_id == run_id)
            connection.execute(
                delete(step_runs).where(
                    step_runs.c.run_id == run_id,
                    step_runs.c.status.not_in(("succeeded", "skipped")),
                )
            )
            done = dict(
                connection.execute(
                    select(step_runs.c.step_id, step_runs.c.output).where(
                        step_runs.c.run_id == run_id
                    )
                ).all()
            )
            attempts = dict(
                connection.execute(
                    select(model_calls.c.step_id, func.max(model_calls.c.attempt))
                    .where(model_calls.c.run_id == run_id)
                    .group_by(model_calls.c.step_id)
                ).all()
            )
        return done, attempts, handed_on

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        outputs: Any = None,
        error: str | None = None,
        owner: str | None = None,
    ) -> bool:
        """Record the run's end and drop its lease. With ``owner``, only while that
        owner still holds the lease: a worker that lost its run cannot overwrite it."""
        query = update(runs).where(runs.c.id == run_id)
        if owner is not None:
            query = query.where(runs.c.lease_owner == owner)
        with self.engine.begin() as connection:
            result = connection.execute(
                query.values(
                    status=status,
                    outputs=outputs,
                    error=error,
                    finished_at=now(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
        return result.rowcount == 1

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        """The run's own row (no steps or calls), or None."""
        with self.engine.connect() as connection:
            row = connection.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        return None if row is None else dict(row)

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


def _ledger_usage(connection: Any, limit: Limit) -> tuple[Decimal, Decimal]:
    """(spent, reserved) in ``limit``'s scope, summed from the ledger: pending rows that
    hold a reservation are reserved; every other row counts what it cost. A pending
    call made before any limit applied counts its worst case as spent: it settles
    without moving counters, so the counter errs high, never low."""
    pending = (model_calls.c.state == "pending") & model_calls.c.reserved_usd.is_not(None)
    spent, reserved = connection.execute(
        select(
            func.coalesce(func.sum(case((~pending, model_calls.c.cost_usd))), 0, type_=Money),
            func.coalesce(func.sum(case((pending, model_calls.c.cost_usd))), 0, type_=Money),
        ).where(*_scope(limit))
    ).one()
    return spent, reserved


def _scope(limit: Limit) -> list[Any]:
    """Conditions selecting the ledger rows in ``limit``'s scope."""
    conditions = []
    if limit.run_id is not None:
        conditions.append(model_calls.c.run_id == limit.run_id)
    if limit.workflow is not None:
        conditions.append(model_calls.c.workflow == limit.workflow)
    if limit.first_day is not None:
        conditions.append(model_calls.c.day >= limit.first_day)
    if limit.last_day is not None:
        conditions.append(model_calls.c.day <= limit.last_day)
    return conditions


def _insert_ignoring_duplicates(connection: Any, table: Any) -> Any:
    """INSERT … ON CONFLICT DO NOTHING, in the connection's dialect."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table).on_conflict_do_nothing()
