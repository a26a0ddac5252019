"""The dashboard: where the money goes (by workflow, step, model and tier, dearest
first, over a date range chosen on the page), what tiering saved, which steps
escalate and why, budgets, the runs waiting for an approval, recent runs; and a
page per run with every attempt.

Rendered on the server with Jinja2 (autoescape on: workflow names, model names,
errors and escalation reasons are data) and inline SVG charts from ``charts``.
The page has no script and no style attribute: its one ``<style>`` element is
allowed by hash (``style_sources``), so the Content-Security-Policy allows
nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestrator import reports
from orchestrator.budgets import BudgetStatus
from orchestrator.encoding import usd
from orchestrator.store import Store
from orchestrator.web import charts

RECENT_RUNS = 20
PAGE = "dashboard.html"
RUN_PAGE = "run.html"
BASE = "base.html"  # holds the pages' one <style>
RANKED = 30  # rows of the steps and models tables
# Outcomes of an attempt that did not answer: why a step climbed.
FAILED = (
    "error",
    "timeout",
    "invalid_output",
    "low_confidence",
    "truncated",
    "unavailable",
    "budget_blocked",
)


@dataclass(frozen=True)
class StepView:
    step_id: str
    status: str
    tier_asked: str | None
    tier_used: str | None
    model: str | None
    calls: int
    cost_usd: Decimal
    escalations: list[str]


@dataclass(frozen=True)
class WaitView:
    """An approval step a run waits on, and what it asks."""

    run_id: str
    workflow: str
    step_id: str
    message: str
    until: datetime | None


@dataclass(frozen=True)
class RunView:
    id: str
    workflow: str
    status: str
    created_at: datetime
    cost_usd: Decimal
    error: str | None = None
    steps: list[StepView] = field(default_factory=list)


@dataclass(frozen=True)
class Escalations:
    """How often a step's runs climbed above the first tier they tried, and why."""

    workflow: str
    step_id: str
    runs: int
    escalated: int
    reasons: list[tuple[str, int]]  # failed attempts' outcomes, commonest first

    @property
    def rate(self) -> float:
        return self.escalated / self.runs if self.runs else 0.0


def environment() -> Environment:
    """Our own templates only, sandboxed like every template we render, with
    autoescape on and StrictUndefined: a misspelt name fails instead of going blank."""
    env = ImmutableSandboxedEnvironment(
        loader=PackageLoader("orchestrator.web"), autoescape=True, undefined=StrictUndefined
    )
    env.filters["usd"] = usd
    return env


def style_sources(env: Environment) -> list[str]:
    """Content-Security-Policy sources for the page's ``<style>`` elements: the hash
    of each. The elements hold no template code, so they render as written."""
    assert env.loader is not None
    source = env.loader.get_source(env, BASE)[0]
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()}'"
        for css in re.findall(r"<style>(.*?)</style>", source, flags=re.DOTALL)
    ]


def render(
    env: Environment,
    store: Store,
    *,
    ladder: list[str],
    since: date,
    until: date,
    budgets: list[BudgetStatus] | None = None,
) -> str:
    """The page for the days from ``since`` to ``until`` (UTC, both included), with
    the budgets in force today."""
    days = (until - since).days + 1
    period = [since + timedelta(days=offset) for offset in range(days)]
    over_time = reports.report(store.engine, by="day,workflow", since=since, until=until)
    by_workflow = reports.rollup(over_time, "workflow")
    by_workflow = replace(by_workflow, groups=_dearest(by_workflow.groups))
    by_tier = reports.spend(store.engine, by="tier", since=since, until=until)
    by_step = reports.spend(store.engine, by="step", since=since, until=until)
    by_model = reports.spend(store.engine, by="model", since=since, until=until)
    total = by_workflow.total.cost_usd

    def share(cost: Decimal) -> str:
        return f"{cost / total:.0%}" if total else "-"

    return env.get_template(PAGE).render(
        days=days,
        since=since,
        until=until,
        report=by_workflow,
        steps=_dearest(by_step)[:RANKED],
        models=_dearest(by_model)[:RANKED],
        share=share,
        escalations=step_escalations(store, since, until),
        spend_chart=charts.spend_over_time(over_time.groups, period),
        tier_chart=charts.tier_mix(by_tier, ladder),
        savings_chart=charts.savings(by_workflow.total),
        runs=recent_runs(store),
        waiting=waiting_approvals(store),
        budgets=budgets or [],
    )


def _dearest(rows: list[reports.SpendRow]) -> list[reports.SpendRow]:
    return sorted(rows, key=lambda row: (-row.cost_usd, row.key))


def step_escalations(store: Store, since: date, until: date) -> list[Escalations]:
    """Each step that ran in the period: its runs, how many of them escalated
    (made a call above the first tier tried), and the outcomes that made them
    climb; the most escalated first."""
    from sqlalchemy import case, distinct, func, select

    from orchestrator.store.tables import model_calls

    calls = model_calls.c
    period = (calls.day >= since, calls.day <= until, calls.eval.is_(None))
    counted = (
        select(
            calls.workflow,
            calls.step_id,
            func.count(distinct(calls.run_id)),
            func.count(distinct(case((calls.escalation_reason.is_not(None), calls.run_id)))),
        )
        .where(*period)
        .group_by(calls.workflow, calls.step_id)
    )
    why = (
        select(calls.workflow, calls.step_id, calls.outcome, func.count())
        .where(*period, calls.outcome.in_(FAILED))
        .group_by(calls.workflow, calls.step_id, calls.outcome)
    )
    with store.engine.connect() as connection:
        rows = connection.execute(counted).all()
        reasons: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
        for workflow, step_id, outcome, count in connection.execute(why):
            reasons[workflow, step_id].append((outcome, int(count)))
    found = [
        Escalations(
            workflow,
            step_id,
            int(runs),
            int(escalated),
            sorted(reasons[workflow, step_id], key=lambda item: (-item[1], item[0])),
        )
        for workflow, step_id, runs, escalated in rows
        if escalated
    ]
    return sorted(found, key=lambda row: (-row.rate, -row.runs, row.workflow, row.step_id))


def render_run(env: Environment, store: Store, run_id: str) -> str | None:
    """A run's page: status, cost, why it failed or waits, every attempt; None if unknown."""
    found = store.run(run_id)
    if found is None:
        return None
    started, ended = found["created_at"], found["finished_at"]
    run = {
        **found,
        "cost_usd": sum((call["cost_usd"] for call in found["calls"]), Decimal(0)),
        "took": "-" if ended is None else f"{(ended - started).total_seconds():.1f} s",
        "waiting": [w for w in waiting_approvals(store) if w.run_id == found["id"]],
    }
    return env.get_template(RUN_PAGE).render(run=run)


def waiting_approvals(store: Store, limit: int = 100) -> list[WaitView]:
    """Every approval step that a waiting run waits on, oldest run first."""
    views = []
    for row in reversed(store.runs(status="waiting", limit=limit)):
        found = store.run(row["id"])
        for step in found["steps"] if found is not None else []:
            if step["status"] == "waiting":
                message = (step["output"] or {}).get("message", "")
                views.append(
                    WaitView(
                        row["id"], row["workflow"], step["step_id"], message, row["waiting_until"]
                    )
                )
    return views


def recent_runs(store: Store, limit: int = RECENT_RUNS) -> list[RunView]:
    """The newest runs with each step's tiers, calls, cost and escalation reasons."""
    views = []
    for row in store.runs(limit=limit):
        found = store.run(row["id"])
        if found is not None:
            views.append(_run_view(found))
    return views


def _run_view(found: dict[str, Any]) -> RunView:
    by_step: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in found["calls"]:
        if call["outcome"] != "unavailable":
            by_step[call["step_id"]].append(call)
    return RunView(
        id=found["id"],
        workflow=found["workflow"],
        status=found["status"],
        created_at=found["created_at"],
        cost_usd=sum((call["cost_usd"] for call in found["calls"]), Decimal(0)),
        error=found["error"],
        steps=[_step_view(step, by_step[step["step_id"]]) for step in found["steps"]],
    )


def _step_view(step: dict[str, Any], calls: list[dict[str, Any]]) -> StepView:
    return StepView(
        step_id=step["step_id"],
        status=step["status"],
        tier_asked=step["tier_asked"],
        tier_used=step["tier_used"],
        model=step["model"],
        calls=len(calls),
        cost_usd=sum((call["cost_usd"] for call in calls), Decimal(0)),
        escalations=sorted(
            {call["escalation_reason"] for call in calls if call["escalation_reason"]}
        ),
    )
