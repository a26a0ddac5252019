"""The dashboard page: spend over time per workflow, tier mix, savings, budgets, the runs
waiting for an approval, recent runs.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
    steps: list[StepView] = field(default_factory=list)


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
    source = env.loader.get_source(env, PAGE)[0]
    return [
        f"'sha256-{base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()}'"
        for css in re.findall(r"<style>(.*?)</style>", source, flags=re.DOTALL)
    ]


def render(
    env: Environment,
    store: Store,
    *,
    ladder: list[str],
    days: int,
    budgets: list[BudgetStatus] | None = None,
) -> str:
    """The page for the last ``days`` days (UTC, today included), with the budgets in force."""
    today = datetime.now(UTC).date()
    period = [today - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
    since = period[0]
    over_time = reports.report(store.engine, by="day,workflow", since=since)
    by_workflow = reports.rollup(over_time, "workflow")
    by_tier = reports.spend(store.engine, by="tier", since=since)
    return env.get_template(PAGE).render(
        days=days,
        since=since,
        today=today,
        report=by_workflow,
        spend_chart=charts.spend_over_time(over_time.groups, period),
        tier_chart=charts.tier_mix(by_tier, ladder),
        savings_chart=charts.savings(by_workflow.total),
        runs=recent_runs(store),
        waiting=waiting_approvals(store),
        budgets=budgets or [],
    )


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
