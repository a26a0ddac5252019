"""Budget limits: which scopes a call counts against, and how much each allows.

A workflow's ``budget:`` limits one run, the workflow per UTC day and per
calendar month; tierflow.yaml's ``budget:`` limits every workflow together per
day and per month. Each scope with a limit has a counter row in
``budget_usage``, keyed as below. Before a call, the store reserves the call's
worst-case cost against every limit in one transaction (see ``Store.open_call``).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from orchestrator.encoding import money
from orchestrator.settings import Settings, WorkflowBudget
from orchestrator.store.counters import Limit, scope_keys

if TYPE_CHECKING:
    from orchestrator.store import Store


def limits(
    settings: Settings, name: str, own: WorkflowBudget, run_id: str | None, day: date
) -> list[Limit]:
    """The limits on a call of ``run_id`` of workflow ``name``, whose budget is
    ``own``, made on ``day``, sorted by key; with no run, the limits of the day
    and month alone.

    Sorted, so concurrent transactions lock counter rows in the same order.
    """
    common = settings.config.budget
    first = day.replace(day=1)
    last = day.replace(day=calendar.monthrange(day.year, day.month)[1])
    run_key, day_key, month_key, all_day_key, all_month_key = scope_keys(run_id or "", name, day)
    found = []
    if own.per_run_usd is not None and run_id is not None:
        label = f"per-run budget of run {run_id}"
        found.append(Limit(run_key, own.per_run_usd, label, True, run_id=run_id))
    if own.daily_usd is not None:
        label = f"daily budget of workflow '{name}' for {day}"
        found.append(
            Limit(day_key, own.daily_usd, label, True, workflow=name, first_day=day, last_day=day)
        )
    if own.monthly_usd is not None:
        label = f"monthly budget of workflow '{name}' for {day:%Y-%m}"
        found.append(
            Limit(
                month_key,
                own.monthly_usd,
                label,
                True,
                workflow=name,
                first_day=first,
                last_day=last,
            )
        )
    if common.daily_usd is not None:
        label = f"global daily budget for {day}"
        found.append(
            Limit(all_day_key, common.daily_usd, label, False, first_day=day, last_day=day)
        )
    if common.monthly_usd is not None:
        label = f"global monthly budget for {day:%Y-%m}"
        found.append(
            Limit(all_month_key, common.monthly_usd, label, False, first_day=first, last_day=last)
        )
    return sorted(found, key=lambda limit: limit.key)


@dataclass(frozen=True)
class BudgetStatus:
    """A limit of the current day or month: spent, held by calls in flight, and left."""

    limit: Limit
    spent_usd: Decimal
    reserved_usd: Decimal

    @property
    def left_usd(self) -> Decimal:
        return self.limit.usd - self.spent_usd - self.reserved_usd

    def as_dict(self) -> dict[str, str]:
        return {
            "budget": self.limit.label,
            "limit_usd": money(self.limit.usd),
            "spent_usd": money(self.spent_usd),
            "reserved_usd": money(self.reserved_usd),
            "left_usd": money(self.left_usd),
        }


def status(settings: Settings, store: Store, day: date | None = None) -> list[BudgetStatus]:
    """Every daily and monthly limit in force on ``day`` (default today, UTC): those
    of the workflows in ``workflows_dir`` and the global ones.

    Only each file's ``name`` and ``budget`` are read, so ``tierflow spend`` stays
    quick: a file whose budget does not load is left out, and ``tierflow
    validate`` says what is wrong with it."""
    from pydantic import ValidationError

    from orchestrator.errors import SpecError
    from orchestrator.loading import read_yaml

    day = day or datetime.now(UTC).date()
    found: dict[str, Limit] = {}
    for path in sorted((settings.root / settings.config.workflows_dir).glob("*.yaml")):
        try:
            data = read_yaml(path).data
            name, budget = data.get("name"), WorkflowBudget.model_validate(data.get("budget", {}))
        except (SpecError, ValidationError):
            continue
        if isinstance(name, str):
            found.update((limit.key, limit) for limit in limits(settings, name, budget, None, day))
    return [
        BudgetStatus(limit, *store.budget_used(limit))
        for limit in sorted(found.values(), key=lambda limit: limit.key)
    ]
