"""Budget counters: one row per budget scope, moved in the ledger's own transactions.

Each scope with a limit has a counter row in ``budget_usage`` ("workflow:NAME:day:
2026-11-22"): spent is settled and abandoned cost, reserved is what pending calls
hold. A reservation is a conditional UPDATE of these rows, so concurrent runs
cannot overspend. Which limits apply is ``orchestrator.budgets``' business; the
store knows only keys, amounts and the ledger rows a scope holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, bindparam, case, func, literal, or_, select, update

from orchestrator.store.tables import Money, budget_usage, model_calls


@dataclass(frozen=True)
class Limit:
    """One limit, and which ledger rows its scope holds (None: no condition)."""

    key: str
    usd: Decimal
    label: str
    own: bool  # the workflow's own budget, as opposed to the global one
    run_id: str | None = None
    workflow: str | None = None
    first_day: date | None = None
    last_day: date | None = None


def scope_keys(run_id: str, workflow: str, day: date) -> list[str]:
    """The counter keys a call of ``run_id`` on ``day`` counts against, limited or not."""
    month = f"{day:%Y-%m}"
    return [
        f"run:{run_id}",
        f"workflow:{workflow}:day:{day}",
        f"workflow:{workflow}:month:{month}",
        f"all:day:{day}",
        f"all:month:{month}",
    ]


# Every call counts against the five scopes of scope_keys; a fixed list of
# parameters keeps the compiled statement cached.
_SCOPES = 5
_MOVE = (
    update(budget_usage)
    .where(budget_usage.c.key.in_([bindparam(f"key{i}") for i in range(_SCOPES)]))
    .values(
        reserved_usd=budget_usage.c.reserved_usd - bindparam("released", type_=Money),
        spent_usd=budget_usage.c.spent_usd + bindparam("spent", type_=Money),
    )
)


def move(connection: Any, row: dict[str, Any], *, released: Decimal, spent: Decimal) -> None:
    """Counters of every scope the call ``row`` counts against: reservation out, cost in."""
    keys = scope_keys(row["run_id"], row["workflow"], row["day"])
    params = {f"key{i}": key for i, key in enumerate(keys)}
    connection.execute(_MOVE, {**params, "released": released, "spent": spent})


def reserve(connection: Any, limit: Limit, amount: Decimal) -> bool:
    """Add ``amount`` to ``limit``'s reserved total unless that would pass the limit."""
    counter = budget_usage.c
    if connection.execute(select(counter.key).where(counter.key == limit.key)).first() is None:
        # The first call in this scope and period: count what the ledger already holds.
        spent, reserved = ledger_usage(connection, limit)
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


class CounterStore:
    """Reads of the budget counters."""

    engine: Engine

    def budget_used(self, limit: Limit) -> tuple[Decimal, Decimal]:
        """(spent, reserved) in ``limit``'s scope: its counter, else the ledger's sums."""
        counter = budget_usage.c
        with self.engine.connect() as connection:
            found = connection.execute(
                select(counter.spent_usd, counter.reserved_usd).where(counter.key == limit.key)
            ).first()
            return (found[0], found[1]) if found else ledger_usage(connection, limit)

    def usage(self, keys: list[str]) -> dict[str, tuple[Decimal, Decimal]]:
        """(spent, reserved) of the budget counters that exist among ``keys``."""
        counter = budget_usage.c
        query = select(counter.key, counter.spent_usd, counter.reserved_usd).where(
            counter.key.in_(keys)
        )
        with self.engine.connect() as connection:
            return {key: (spent, reserved) for key, spent, reserved in connection.execute(query)}


def ledger_usage(connection: Any, limit: Limit) -> tuple[Decimal, Decimal]:
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
