"""Spend from the ledger, grouped by workflow, step, tier, model or day.

Every figure is summed in SQL over integer pico-dollars, so group totals and
the grand total equal the sum of the ledger rows exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, case, func, select

from orchestrator.errors import UserError
from orchestrator.store.tables import Money, model_calls

GROUPS = {
    "workflow": ("workflow",),
    "step": ("workflow", "step_id"),
    "tier": ("tier_used",),
    "model": ("model",),
    "day": ("day",),
}


@dataclass(frozen=True)
class SpendRow:
    key: tuple[str, ...]
    calls: int  # provider requests; a tier skipped as unavailable is not one
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    reference_cost_usd: Decimal

    @property
    def savings_usd(self) -> Decimal:
        """What the all-frontier (reference model) run would have cost, minus what this cost."""
        return self.reference_cost_usd - self.cost_usd

    def as_dict(self, by: str) -> dict[str, Any]:
        return {
            **dict(zip(GROUPS[by], self.key, strict=True)),
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": str(self.cost_usd),
            "reference_cost_usd": str(self.reference_cost_usd),
            "savings_usd": str(self.savings_usd),
        }


def parse_when(text: str | None, *, end: bool = False) -> date | None:
    """``2026-11-01``, or ``30d`` for 30 days ago. ``--until`` includes its day."""
    if text is None:
        return None
    if match := re.fullmatch(r"(\d+)d", text.strip()):
        return datetime.now(UTC).date() - timedelta(days=int(match.group(1)))
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        which = "--until" if end else "--since"
        raise UserError(
            f"{which} {text!r}: expected YYYY-MM-DD or a number of days like 30d"
        ) from None


def spend(
    engine: Engine, *, by: str = "workflow", since: date | None = None, until: date | None = None
) -> list[SpendRow]:
    if by not in GROUPS:
        raise UserError(f"--by {by!r}: choose one of {', '.join(GROUPS)}")
    keys = [model_calls.c[name] for name in GROUPS[by]]
    query = (
        select(
            *keys,
            func.sum(case((model_calls.c.outcome == "unavailable", 0), else_=1)),
            func.sum(model_calls.c.prompt_tokens),
            func.sum(model_calls.c.completion_tokens),
            func.sum(model_calls.c.cost_usd, type_=Money),
            func.coalesce(func.sum(model_calls.c.reference_cost_usd), 0, type_=Money),
        )
        .group_by(*keys)
        .order_by(*keys)
    )
    if since is not None:
        query = query.where(model_calls.c.day >= since)
    if until is not None:
        query = query.where(model_calls.c.day <= until)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    width = len(keys)
    return [
        SpendRow(
            key=tuple(str(part) for part in row[:width]),
            calls=int(row[width]),
            prompt_tokens=int(row[width + 1]),
            completion_tokens=int(row[width + 2]),
            cost_usd=row[width + 3] or Decimal(0),
            reference_cost_usd=row[width + 4] or Decimal(0),
        )
        for row in rows
    ]


def total(rows: list[SpendRow]) -> SpendRow:
    return SpendRow(
        key=("total",),
        calls=sum(row.calls for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        cost_usd=sum((row.cost_usd for row in rows), Decimal(0)),
        reference_cost_usd=sum((row.reference_cost_usd for row in rows), Decimal(0)),
    )
