"""Ledger writes: a call pending before its request, settled or abandoned after, and
each step's result written with its calls in one transaction."""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Engine,
    String,
    bindparam,
    delete,
    func,
    insert,
    select,
    type_coerce,
    update,
)

from orchestrator.errors import UserError
from orchestrator.ledger import ACCEPTED, Call, StepRecord, ToolRun
from orchestrator.store import counters, prepared
from orchestrator.store.counters import Limit
from orchestrator.store.leases import Lease, fence, fence_written, lost_on_conflict
from orchestrator.store.tables import (
    PICO_PER_USD,
    feedback,
    model_calls,
    runs,
    step_runs,
    tool_calls,
    traces,
)

CALL_FIELDS = tuple(field.name for field in fields(Call))
_INSERT_STEP = insert(step_runs)
_INSERT_CALL = insert(model_calls)
_RUN_STATUS = select(runs.c.status).where(runs.c.id == bindparam("s_run_id"))
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


# A tier: auto step's history (CallStore.route_history), built once.
_MINE = (
    model_calls.c.workflow == bindparam("h_workflow"),
    model_calls.c.step_id == bindparam("h_step_id"),
    model_calls.c.route_key == bindparam("h_key"),
    model_calls.c.judged.is_(None),
)
_HISTORY_CALLS = (
    select(
        model_calls.c.tier_used,
        model_calls.c.outcome,
        type_coerce(model_calls.c.cost_usd, BigInteger),
        model_calls.c.latency_ms,
        type_coerce(model_calls.c.created_at, String),
        model_calls.c.run_id,
    )
    .where(*_MINE, model_calls.c.state != "pending")
    .order_by(model_calls.c.id.desc())
    .limit(bindparam("h_limit"))
)
_HISTORY_LABELS = (
    select(
        feedback.c.tier,
        feedback.c.good,
        type_coerce(feedback.c.created_at, String),
        feedback.c.run_id,
    )
    .where(
        feedback.c.step_id == bindparam("h_step_id"),
        feedback.c.run_id.in_(select(model_calls.c.run_id).where(*_MINE)),
    )
    .order_by(feedback.c.id.desc())
    .limit(bindparam("h_limit"))
)


@dataclass
class Checkpoint:
    """Where a resumed run carries on: finished steps' outputs, each step's last
    attempt number, and where handed-off steps continue (tier, used, reason)."""

    done: dict[str, Any] = field(default_factory=dict)
    last_attempts: dict[str, int] = field(default_factory=dict)
    handed_on: dict[str, dict[str, Any]] = field(default_factory=dict)


_PENDING = select(
    model_calls.c.id,
    model_calls.c.run_id,
    model_calls.c.workflow,
    model_calls.c.day,
    model_calls.c.cost_usd,
    model_calls.c.reserved_usd,
).where(model_calls.c.state == "pending", model_calls.c.run_id == bindparam("p_run_id"))
_PENDING_OF_STEP = _PENDING.where(model_calls.c.step_id == bindparam("p_step_id"))


def abandon(connection: Any, why: str, *, run_id: str, step_id: str | None = None) -> None:
    """Pending calls of the run (or of one of its steps) become abandoned: they may
    have been billed, so their worst-case estimate moves from reserved to spent
    and stays there."""
    if step_id is None:
        pending = connection.execute(_PENDING, {"p_run_id": run_id}).mappings()
    else:
        query = _PENDING_OF_STEP
        pending = connection.execute(query, {"p_run_id": run_id, "p_step_id": step_id}).mappings()
    for row in pending.all():
        connection.execute(
            update(model_calls)
            .where(model_calls.c.id == row["id"])
            .values(state="abandoned", outcome="abandoned", error=why, reference_cost_usd=None)
        )
        if row["reserved_usd"] is not None:
            cost = row["cost_usd"]
            counters.move(connection, row, released=cost, spent=cost)
    running = [tool_calls.c.run_id == run_id, tool_calls.c.outcome == "running"]
    if step_id is not None:
        running.append(tool_calls.c.step_id == step_id)
    connection.execute(
        update(tool_calls)
        .where(*running)
        .values(outcome="interrupted", error=f"{why}; the tool may have had its effect")
    )


class CallStore:
    engine: Engine

    def record_step(
        self,
        *,
        run_id: str,
        workflow: str,
        content_hash: str,
        record: StepRecord,
        lease: Lease | None = None,
        eval: bool = False,
    ) -> str | None:
        """The step's result and all its ledger rows, in one transaction.

        ``eval`` marks rows of a ``tierflow eval`` run. With ``lease``, only while it is the run's (else ``LeaseLost``, nothing
        written). Returns the run's status as of that transaction, so the
        executor sees a cancellation before it starts another step.
        """
        answer = record.answer
        handoff = record.handoff or {}
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
            "handoff_tier": handoff.get("tier"),
            "handoff_used": handoff.get("used"),
            "handoff_reason": handoff.get("reason"),
        }
        accepted = _accepted(record)
        call_rows = [
            _call_row(run_id, workflow, content_hash, record, call, accepted=call in accepted)
            for call in record.calls
        ]
        # Statements built once and run through ``prepared``: the per-step hot path.
        with lost_on_conflict(self.engine, lease), self.engine.begin() as connection:
            prepared.execute(connection, _INSERT_STEP, step_row)
            for row, call in zip(call_rows, record.calls, strict=True):
                # The call's pending row (written before the request) is settled and
                # its reservation gives way to its cost; a call recorded without
                # one (refused by a budget, say) is inserted as it is.
                if prepared.execute(connection, _SETTLE_CALL, row).rowcount == 0:
                    columns = {key: value for key, value in row.items() if not key.startswith("b_")}
                    columns.setdefault("agent", record.agent)
                    columns["eval"] = True if eval else None
                    prepared.execute(connection, _INSERT_CALL, columns)
                elif call.reserved_usd is not None:
                    counters.move(connection, row, released=call.reserved_usd, spent=call.cost_usd)
            if record.traces:
                connection.execute(
                    insert(traces),
                    [
                        {"run_id": run_id, "step_id": record.step_id, **asdict(trace)}
                        for trace in record.traces
                    ],
                )
            for run in record.tools:
                # A tool's row was written ``running`` before it ran (refused calls have none).
                row = {"run_id": run_id, "step_id": record.step_id, **asdict(run)}
                if run.id is None:
                    connection.execute(insert(tool_calls), [row])
                else:
                    connection.execute(
                        update(tool_calls).where(tool_calls.c.id == run.id).values(row)
                    )
            if record.status != "succeeded":
                # Calls cut off by a cancellation never settle; they may have been billed.
                abandon(connection, "cancelled mid-call", run_id=run_id, step_id=record.step_id)
            status = fence_written(connection, lease)  # LeaseLost: all of it rolls back
            if status is None:  # not fenced
                found = prepared.execute(connection, _RUN_STATUS, {"s_run_id": run_id}).fetchone()
                status = None if found is None else found[0]
            return status

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
        lease: Lease | None = None,
        eval: bool = False,
    ) -> Limit | None:
        """Reserve a call's worst-case cost and write it pending, before its request.

        In one transaction, the call's cost is added to the reserved amount of
        every limit, each with a conditional UPDATE that fails if the limit
        would be passed, and the pending row is written. Returns the limit that
        refused the call (nothing is written then), or None. With ``lease``, only
        while it is the run's: else ``LeaseLost``, and the request must not go out.
        """
        row = {
            "run_id": run_id,
            "step_id": step_id,
            "workflow": workflow,
            "workflow_hash": content_hash,
            "agent": agent,
            "day": call.created_at.astimezone(UTC).date(),
            "state": "pending",
            "eval": True if eval else None,
            **{name: getattr(call, name) for name in CALL_FIELDS},
        }
        with (
            lost_on_conflict(self.engine, lease),
            self.engine.connect() as connection,
            connection.begin() as transaction,
        ):
            if limits:  # first: it takes the write lock before the counters are read
                fence(connection, lease)
            for limit in limits or []:
                if not counters.reserve(connection, limit, call.cost_usd):
                    transaction.rollback()
                    return limit
            prepared.execute(connection, _INSERT_CALL, row)
            if not limits:
                fence_written(connection, lease)  # LeaseLost: the row rolls back
        return None

    def open_tool_call(
        self, *, run_id: str, step_id: str, run: ToolRun, lease: Lease | None = None
    ) -> int:
        """``run``'s row, written ``running`` before its tool runs; its id. With
        ``lease``, only while it is the run's: else ``LeaseLost``, and the tool must not run."""
        row = {"run_id": run_id, "step_id": step_id, **asdict(run)}
        del row["id"]
        with lost_on_conflict(self.engine, lease), self.engine.begin() as connection:
            found = connection.execute(insert(tool_calls).returning(tool_calls.c.id), row)
            fence_written(connection, lease)  # LeaseLost: the row rolls back
            return int(found.scalar_one())

    def route_history(
        self, *, workflow: str, step_id: str, route_key: str, limit: int
    ) -> list[tuple[str, str, float, float]]:
        """A ``tier: auto`` step's newest rows under ``route_key``, newest first:
        (tier, outcome, cost in USD, latency in ms); judges' rows and pending ones
        left out. Labels on its answers (people's, and ``tierflow eval``'s) come in
        among them, by time, as the outcome ``good`` or ``bad`` at the tier that
        gave the answer, the newest one per run, instead of the automatic pass of
        that tier's calls (their outcome reads ``labelled``: a cost, no label).

        Read before every ``tier: auto`` step: its two statements are built once,
        money comes back as integer pico-dollars and times as the database gives
        them (both sides alike), merged in order without a sort.
        """
        params = {
            "h_workflow": workflow,
            "h_step_id": step_id,
            "h_key": route_key,
            "h_limit": limit,
        }
        with self.engine.connect() as connection:
            calls = connection.execute(_HISTORY_CALLS, params).all()
            labels = connection.execute(_HISTORY_LABELS, params).all()
        # A label on an answer stands instead of the automatic pass of the calls
        # at the tier that gave it (a consistency step's samples too); the calls
        # still say what the tier costs. Failures below that tier stay failures.
        labelled: dict[str, str] = {}
        for tier, _, _, run_id in labels:
            labelled.setdefault(run_id, tier)  # the newest label of each answer
        merged = heapq.merge(calls, labels, key=lambda row: row[-2], reverse=True)
        history = []
        counted: set[str] = set()
        for row in merged:
            if len(row) == 4:  # a label
                tier, good, _, run_id = row
                if run_id not in counted:
                    counted.add(run_id)
                    history.append((tier, "good" if good else "bad", 0.0, 0.0))
            else:
                tier, outcome, pico, latency, _, run_id = row
                if outcome in ACCEPTED and labelled.get(run_id) == tier:
                    outcome = "labelled"
                history.append((tier, outcome, pico / PICO_PER_USD, latency))
            if len(history) == limit:
                break
        return history

    def calibration_labels(
        self,
        *,
        workflow: str,
        step_id: str,
        model: str,
        signal: str,
        limit: int,
        before: datetime | None = None,
    ) -> list[tuple[float, bool]]:
        """(raw score, right) of the step's labelled answers on ``model`` scored by
        ``signal``, newest first: for each labelled run, the answer its step took
        (the last accepted, items and judges aside) and its newest label, given
        before ``before`` if set."""
        newest = select(func.max(feedback.c.id)).where(feedback.c.step_id == step_id)
        if before is not None:
            newest = newest.where(feedback.c.created_at < before)
        labels = (
            select(feedback.c.run_id, feedback.c.good, feedback.c.id)
            .where(feedback.c.id.in_(newest.group_by(feedback.c.run_id)))
            .subquery()
        )
        answers = (
            select(func.max(model_calls.c.id).label("id"))
            .where(
                model_calls.c.workflow == workflow,
                model_calls.c.step_id == step_id,
                model_calls.c.run_id.in_(select(labels.c.run_id)),
                model_calls.c.judged.is_(None),
                model_calls.c.item_index.is_(None),
                model_calls.c.outcome.in_(ACCEPTED),
            )
            .group_by(model_calls.c.run_id)
            .subquery()
        )
        query = (
            select(
                func.coalesce(model_calls.c.raw_confidence, model_calls.c.confidence),
                labels.c.good,
            )
            .join(answers, answers.c.id == model_calls.c.id)
            .join(labels, labels.c.run_id == model_calls.c.run_id)
            .where(
                model_calls.c.model == model,
                model_calls.c.signal == signal,
                model_calls.c.confidence.is_not(None),
            )
            .order_by(labels.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [(float(score), bool(good)) for score, good in connection.execute(query)]

    def add_feedback(self, run_id: str, step_id: str, *, good: bool, note: str | None) -> None:
        """A person's label on a succeeded step's answer; a ``UserError`` names what is wrong."""
        with self.engine.begin() as connection:
            found = connection.execute(
                select(step_runs.c.step_id, step_runs.c.status, step_runs.c.tier_used).where(
                    step_runs.c.run_id == run_id
                )
            ).all()
            steps = {step: status for step, status, _ in found}
            if step_id not in steps:
                raise UserError(
                    f"run {run_id} has no step '{step_id}'; its steps: {', '.join(steps) or 'none'}"
                )
            if steps[step_id] != "succeeded":
                raise UserError(
                    f"step '{step_id}' of run {run_id} is {steps[step_id]}: it has no answer to label"
                )
            connection.execute(
                insert(feedback).values(
                    run_id=run_id,
                    step_id=step_id,
                    good=good,
                    note=note,
                    tier=next(tier for step, _, tier in found if step == step_id),
                    created_at=datetime.now(UTC),
                )
            )

    def prepare_resume(self, lease: Lease) -> Checkpoint:
        """Where the run carries on, for the executor holding ``lease``.

        Calls left pending by a dead process become abandoned (they may have
        been billed, so their estimate stays in the spend), and unfinished step
        records are cleared for their re-run.
        """
        run_id = lease.run_id
        with self.engine.begin() as connection:
            fence(connection, lease)
            handed_on = {
                step_id: {"tier": tier, "used": used or 0, "reason": reason}
                for step_id, tier, used, reason in connection.execute(
                    select(
                        step_runs.c.step_id,
                        step_runs.c.handoff_tier,
                        step_runs.c.handoff_used,
                        step_runs.c.handoff_reason,
                    ).where(step_runs.c.run_id == run_id, step_runs.c.status == "handed_off")
                )
            }
            abandon(connection, "its process died mid-call", run_id=run_id)
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
        return Checkpoint(done=done, last_attempts=attempts, handed_on=handed_on)


def _accepted(record: StepRecord) -> list[Call]:
    """The calls whose answers a succeeded step took: one per item of a ``for_each``."""
    if record.status != "succeeded":
        return []
    taken: dict[int | None, Call] = {}
    for call in record.calls:
        if call.outcome in ACCEPTED and call.judged is None:
            taken[call.item_index] = call  # the last one of its item
    return list(taken.values())


def _call_row(
    run_id: str,
    workflow: str,
    content_hash: str,
    record: StepRecord,
    call: Call,
    *,
    accepted: bool,
) -> dict[str, Any]:
    """The row of ``call``, as a settlement of its pending row (every column named
    here is set) or as an insert. A judge's pending row keeps the judge's agent.

    Only an accepted answer keeps its reference cost: the all-frontier
    counterfactual is one reference call per step (per item) with the accepted
    answer's tokens, not one per attempt."""
    row = {
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
    if call.judged is not None:
        del row["agent"]
    if not accepted:
        row["reference_cost_usd"] = None
    return row
