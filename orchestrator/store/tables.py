"""The tables. Alembic migrations in migrations/ are the only way they change.

Money is stored as an integer count of pico-dollars (1e-12 USD) and read back
as ``Decimal``: exact on SQLite, which has no decimal type, and summable in SQL
on both databases.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

PICO_PER_USD = 10**12


class Money(TypeDecorator[Decimal]):
    """Exact USD, held as integer pico-dollars."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> int | None:
        if value is None:
            return None
        scaled = Decimal(value) * PICO_PER_USD
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{value} USD is finer than a pico-dollar")
        return int(scaled)

    def process_result_value(self, value: Any, dialect: Any) -> Decimal | None:
        if value is None:
            return None
        return (Decimal(value) / PICO_PER_USD).normalize()


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("workflow", String(100), nullable=False),
    Column("workflow_version", String(50)),
    Column("workflow_hash", String(64), nullable=False),
    Column("workflow_path", String(1000)),  # where a worker finds the file again
    Column("status", String(16), nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("outputs", JSON),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    # The worker executing the run holds a lease; a stale lease means it died.
    # The token grows on every acquisition and fences every write of the run;
    # expiry is seconds since the epoch on the database's clock (store/clock.py).
    Column("lease_owner", String(200)),
    Column("lease_token", Integer, nullable=False, server_default="0"),
    Column("lease_expires_s", Float),
    # A queued run waits on this queue; the sweeper publishes it again if its
    # message was lost (a broker restart), at most once per period.
    Column("queue", String(200)),
    Column("enqueued_at", DateTime(timezone=True)),
    Column("time_limit_s", Float),  # a hard limit for each task that executes it
    Column("eval", Boolean),  # made by tierflow eval (True), else NULL
    # A retry: the run whose finished steps it reused (tierflow retry).
    Column("retry_of", String(32)),
    Column("tags", JSON),  # {"team": "growth"}: spend groups and filters by them; NULL: none
    # A waiting run (an approval step) fails if nobody decides by then; NULL: no limit.
    Column("waiting_until", DateTime(timezone=True)),
    Index(None, "workflow", "created_at"),
    Index(None, "status"),
    Index("ix_runs_versions", "workflow", "workflow_hash", "workflow_version"),
)

step_runs = Table(
    "step_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("status", String(16), nullable=False),  # succeeded, failed, skipped
    Column("output", JSON),
    Column("error", Text),
    Column("tier_asked", String(50)),
    Column("tier_used", String(50)),
    Column("model", String(200)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    # A handed_off step carries on, on another tier's worker, from here.
    Column("handoff_tier", String(50)),
    Column("handoff_used", Integer),  # attempts it used before the hand-off
    Column("handoff_reason", Text),  # why it escalated, for its next call's row
    Column("reused_from", String(32)),  # a retry's step taken as it was from this run
    UniqueConstraint("run_id", "step_id"),
)

model_calls = Table(
    "model_calls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("item_index", Integer),  # position in a for_each list
    Column("workflow", String(100), nullable=False),
    Column("workflow_hash", String(64), nullable=False),
    Column("agent", String(100), nullable=False),
    Column("tier_asked", String(50), nullable=False),
    Column("tier_used", String(50), nullable=False),
    Column("model", String(200), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost_usd", Money, nullable=False),
    Column("reference_cost_usd", Money),
    # The worst case reserved before the request; what cost_usd leaves of it was released.
    Column("reserved_usd", Money),
    Column("local", Boolean),  # served by a local tier: its cost is not provider spend
    # Served by a stand-in for a real model (a tier marked simulated): its cost is
    # what the real model would have charged, and reports say so.
    Column("simulated", Boolean),
    # reported, counted (the provider reported none), worst_case, or NULL (nothing billed).
    Column("usage_source", String(12)),
    # The confidence signal that scored the answer (logprob, consistency, judge) and
    # its score in [0, 1]; a signal with no score: the backend gave nothing to score.
    Column("signal", String(16)),
    Column("confidence", Float),
    # The score before calibration, when the step's labels calibrated it (then
    # ``confidence`` is the calibrated probability); NULL: ``confidence`` is raw.
    Column("raw_confidence", Float),
    Column("judged", Integer),  # a judge's call: the attempt it graded
    # Kinds of personal data the prompt held (email, phone, ...; never the values).
    Column("personal", String(200)),
    # How the step's start tier was chosen: written, auto, explore or downgrade;
    # for tier: auto, the start's expected pass rate and the step's route key.
    Column("routed", String(12)),
    Column("expected_pass", Float),
    Column("route_key", String(16)),
    Column("latency_ms", Float, nullable=False),
    Column("outcome", String(20), nullable=False),
    # pending: written before the request; settled: its real usage is known;
    # abandoned: its process died mid-call, so the worst-case estimate stays.
    Column("state", String(10), nullable=False, server_default="settled"),
    Column("error", Text),
    Column("escalation_reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("day", Date, nullable=False),  # UTC day of created_at, for reports by day
    # A call of a tierflow eval run (True), else NULL: spend leaves it out unless asked.
    Column("eval", Boolean),
    UniqueConstraint("run_id", "step_id", "attempt"),
    Index("ix_model_calls_route", "workflow", "step_id", "route_key"),
    Index(None, "workflow", "day"),
    Index(None, "day"),
    # Spend reports read these two indexes alone (reports.py). The first holds
    # every column they sum, led by the columns they group by; the second
    # holds the escalated calls, whose free-text reason is too long to index.
    Index(
        "ix_model_calls_spend",
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
        "local",
        "eval",
        "simulated",
    ),
    Index(
        "ix_model_calls_escalated",
        "workflow",
        "workflow_hash",
        "step_id",
        "tier_used",
        "model",
        "day",
        "outcome",
        "eval",
        sqlite_where=text("escalation_reason IS NOT NULL"),
        postgresql_where=text("escalation_reason IS NOT NULL"),
    ),
)

# Running totals for each budget scope with a limit ("workflow:NAME:day:2026-11-22"):
# spent is settled and abandoned cost, reserved is what pending calls hold. A
# reservation is a conditional UPDATE of these rows, so concurrent runs cannot
# overspend; they move in the same transactions as the ledger rows they total.
budget_usage = Table(
    "budget_usage",
    metadata,
    Column("key", String(300), primary_key=True),
    Column("spent_usd", Money, nullable=False),
    Column("reserved_usd", Money, nullable=False),
)

# Answers kept for ``cache:`` steps, by the hash of everything that shapes an
# answer (``orchestrator.cache``). A hit is re-checked against the step's
# schema and checks before it is taken.
answer_cache = Table(
    "answer_cache",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("workflow", String(100), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("answer", Text, nullable=False),
    # The tokens of the call that made it: what a hit would have cost the reference model.
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),  # NULL: kept until cleared
    Index(None, "workflow"),
)

# Each tool call of a step's tool loop: sizes and outcome, never the values.
tool_calls = Table(
    "tool_calls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("attempt", Integer, nullable=False),  # the model turn that asked for it
    Column("item_index", Integer),
    Column("name", String(100), nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("arguments_bytes", Integer, nullable=False),
    Column("result_bytes", Integer, nullable=False),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index(None, "run_id", "step_id"),
)

# What a traced step's calls were sent and got back (trace:), secrets masked.
traces = Table(
    "traces",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("item_index", Integer),
    Column("messages", JSON, nullable=False),
    Column("answer", Text),  # NULL: no answer came
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index(None, "run_id", "step_id"),
)

# A person's decision on an approval step, once per step of a run.
approvals = Table(
    "approvals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("approved", Boolean, nullable=False),
    Column("note", Text),
    Column("decided_by", String(200), nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("run_id", "step_id"),
)

# What people said of a step's answer: a label the router counts (tier: auto).
feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step_id", String(100), nullable=False),
    Column("good", Boolean, nullable=False),
    Column("note", Text),
    Column("tier", String(50)),  # the tier whose answer it labels
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index(None, "run_id", "step_id"),
    Index(None, "step_id", "id"),  # a step's newest labels first, for the router
)
