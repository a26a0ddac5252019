"""Spend from the ledger, grouped by workflow, version, step, tier, model or day.

Every figure is summed in SQL over integer pico-dollars, so group totals and
the grand total equal the sum of the ledger rows exactly. What the figures mean:

- ``calls``: provider requests. A model skipped as unavailable leaves a ledger
  row (0 tokens, $0) but is not a call; neither is a ``cache_hit`` (0 tokens,
  $0, and the reference cost of the answer it gave again, so savings count it).
- ``escalated_calls``: calls that carry an ``escalation_reason``. The scheduler
  sets one on every call it makes on a tier above the first tier it tried for
  that step (or ``for_each`` item), because everything tried below failed,
  gave an invalid answer or was unreachable. A retry on another model of the
  same tier is not an escalation, and a ``tier: auto`` step that starts on the
  cheapest tier is not one either.
- ``escalation_rate``: ``escalated_calls / calls`` (0 with no calls): the share
  of the calls a cascade paid for only because a cheaper tier did not do.
  Numerator and denominator are sums, so a total's rate is that of its rows.
- ``local_cost_usd``: the part of ``cost_usd`` spent on local tiers (a local
  model priced per token or per hour of its machine); ``provider_cost_usd`` is
  the rest, billed by providers.
- ``savings_usd``: ``reference_cost_usd - cost_usd``. The all-frontier
  counterfactual is one ``reference_model`` call per step (per item) with the
  accepted answer's tokens: only that row carries a ``reference_cost_usd``
  (``store.calls``), every other row counts $0 there, and every row's cost
  counts. A run that did not succeed has each row's counterfactual set to its
  cost when it ends, so it claims no savings. A row recorded with no reference
  model counts $0 there.
- ``simulated_cost_usd``: the part of ``cost_usd`` recorded for calls to a
  tier marked ``simulated`` (a stand-in that answered as a real model would,
  priced as that model): money that was not spent. Tables that show it say so.
- Pending and abandoned rows count with their worst-case estimate, so recorded
  spend never falls below real spend.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    FromClause,
    Integer,
    Select,
    Subquery,
    and_,
    case,
    func,
    literal_column,
    select,
    union_all,
)

from orchestrator.budgets import BudgetStatus
from orchestrator.encoding import money
from orchestrator.errors import UserError
from orchestrator.loading import suggest
from orchestrator.store.tables import Money, model_calls, runs

# A grouping name and the fields that key its groups. A step id or a version
# means nothing without its workflow, so those groupings carry it too.
GROUPS = {
    "workflow": ("workflow",),
    "step": ("workflow", "step_id"),
    "tier": ("tier_used",),
    "model": ("model",),
    "day": ("day",),
    "version": ("workflow", "workflow_version"),
}
# The columns partial sums may be grouped by: the leading columns of the
# covering index ix_model_calls_spend, in its order (see spend_query).
PARTIAL_KEYS = ("workflow", "workflow_hash", "step_id", "tier_used", "model", "day")
# A skipped model and a cache hit made no request.
_IS_CALL = model_calls.c.outcome.not_in(("unavailable", "cache_hit"))
_NONE: ColumnElement[int] = literal_column("0", Integer)


@dataclass(frozen=True)
class SpendRow:
    """One group's figures; ``key`` holds its fields' values (a day as YYYY-MM-DD)."""

    key: tuple[str | None, ...]
    calls: int
    escalated_calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    reference_cost_usd: Decimal
    local_cost_usd: Decimal = Decimal(0)
    simulated_cost_usd: Decimal = Decimal(0)

    @property
    def provider_cost_usd(self) -> Decimal:
        return self.cost_usd - self.local_cost_usd

    @property
    def savings_usd(self) -> Decimal:
        """What the all-frontier (reference model) run would have cost, minus what this cost."""
        return self.reference_cost_usd - self.cost_usd

    @property
    def escalation_rate(self) -> float:
        """Share of calls made on a tier above the first one tried; see the module docstring."""
        return self.escalated_calls / self.calls if self.calls else 0.0

    def figures(self) -> dict[str, Any]:
        """The measures as JSON values: money as exact decimal strings."""
        return {
            "calls": self.calls,
            "escalated_calls": self.escalated_calls,
            "escalation_rate": round(self.escalation_rate, 6),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": money(self.cost_usd),
            "provider_cost_usd": money(self.provider_cost_usd),
            "local_cost_usd": money(self.local_cost_usd),
            "simulated_cost_usd": money(self.simulated_cost_usd),
            "reference_cost_usd": money(self.reference_cost_usd),
            "savings_usd": money(self.savings_usd),
        }

    def as_dict(self, fields: tuple[str, ...]) -> dict[str, Any]:
        return {**dict(zip(fields, self.key, strict=True)), **self.figures()}


@dataclass(frozen=True)
class SpendReport:
    """Groups and their total, as ``tierflow spend``, ``GET /spend`` and the dashboard show them.

    ``total`` covers every ledger row the period holds, also when ``top`` keeps
    only the dearest groups. ``budgets`` are the limits in force today, with what
    is spent, reserved and left of each (``budgets.status``).
    """

    by: str
    fields: tuple[str, ...]
    since: date | None
    until: date | None
    top: int | None
    groups: list[SpendRow]
    total: SpendRow
    budgets: list[BudgetStatus] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "top": self.top,
            "groups": [row.as_dict(self.fields) for row in self.groups],
            "total": self.total.figures(),
            "budgets": [budget.as_dict() for budget in self.budgets],
        }


def parse_when(text: str | None, *, end: bool = False) -> date | None:
    """``2026-11-01``, or ``30d`` for 30 days ago, within the years 1 to 9999.
    ``--until`` includes its day."""
    if text is None:
        return None
    try:
        if match := re.fullmatch(r"(\d+)d", text.strip()):
            return datetime.now(UTC).date() - timedelta(days=int(match.group(1)))
        return date.fromisoformat(text.strip())
    except (ValueError, OverflowError):  # not a date, past int()'s digit limit, or before year 1
        which = "--until" if end else "--since"
        raise UserError(
            f"{which} {text[:40]!r}: expected YYYY-MM-DD or a number of days like 30d,"
            " within the years 1 to 9999"
        ) from None


@dataclass(frozen=True)
class Only:
    """Which ledger rows a report counts: of one workflow, step, model, and of runs
    carrying every one of ``tags``; None (or empty): all."""

    workflow: str | None = None
    step: str | None = None
    model: str | None = None
    tags: tuple[tuple[str, str], ...] = ()


def tag_pairs(texts: Iterable[str] | None) -> tuple[tuple[str, str], ...]:
    """``key=value`` texts (``-t team=growth``, ``?tag=team=growth``) as pairs."""
    pairs = []
    for text in texts or ():
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UserError(f"tag {text!r}: expected key=value, like team=growth")
        pairs.append((key, value))
    return tuple(pairs)


def group_fields(by: str) -> tuple[str, ...]:
    """The key fields of ``by``: a grouping name, or several joined by commas
    (``day,workflow``); ``tag:KEY`` groups by the value of the runs' tag KEY."""
    fields: list[str] = []
    for name in (part.strip() for part in by.split(",")):
        if name.startswith("tag:"):
            if not re.fullmatch(r"[a-z][a-z0-9_.-]{0,39}", name[4:]):
                raise UserError(f"--by {name!r}: name a tag, like tag:team")
            if name not in fields:
                fields.append(name)
            continue
        if name not in GROUPS:
            raise UserError(
                f"--by {name!r}: choose one of {', '.join(GROUPS)} or tag:KEY, or several"
                f" joined by commas (day,workflow){suggest(name, list(GROUPS))}"
            )
        fields.extend(field for field in GROUPS[name] if field not in fields)
    return tuple(fields)


def spend(
    engine: Engine,
    *,
    by: str = "workflow",
    since: date | None = None,
    until: date | None = None,
    include_eval: bool = False,
    only: Only = Only(),
) -> list[SpendRow]:
    """Every group of ``by`` in the period, ordered by its key; the calls of
    ``tierflow eval`` runs only with ``include_eval``; only the rows ``only`` keeps."""
    fields = group_fields(by)
    with engine.connect() as connection:
        query = spend_query(
            fields, since, until, dialect=engine.dialect.name, include_eval=include_eval, only=only
        )
        rows = connection.execute(query).all()
    return [_row(row, len(fields)) for row in rows]


def report(
    engine: Engine,
    *,
    by: str | None = None,
    since: date | None = None,
    until: date | None = None,
    top: int | None = None,
    budgets: list[BudgetStatus] | None = None,
    include_eval: bool = False,
    only: Only = Only(),
) -> SpendReport:
    """``spend`` with its total; ``top`` keeps the N dearest groups, dearest first.

    ``by`` defaults to workflow, or to step with ``top``: the dearest steps.
    """
    if top is not None and top < 1:
        raise UserError(f"--top {top}: expected a number of groups, 1 or more")
    by = by or ("step" if top is not None else "workflow")
    groups = spend(engine, by=by, since=since, until=until, include_eval=include_eval, only=only)
    overall = total(groups)
    if top is not None:
        groups = sorted(groups, key=lambda row: row.cost_usd, reverse=True)[:top]
    return SpendReport(
        by=by,
        fields=group_fields(by),
        since=since,
        until=until,
        top=top,
        groups=groups,
        total=overall,
        budgets=budgets or [],
    )


def total(rows: list[SpendRow]) -> SpendRow:
    return SpendRow(
        key=("total",),
        calls=sum(row.calls for row in rows),
        escalated_calls=sum(row.escalated_calls for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        cost_usd=sum((row.cost_usd for row in rows), Decimal(0)),
        reference_cost_usd=sum((row.reference_cost_usd for row in rows), Decimal(0)),
        local_cost_usd=sum((row.local_cost_usd for row in rows), Decimal(0)),
        simulated_cost_usd=sum((row.simulated_cost_usd for row in rows), Decimal(0)),
    )


def rollup(found: SpendReport, by: str) -> SpendReport:
    """``found`` summed again by fewer fields, without another query; exact like the SQL sums.

    ``by``'s fields must be among ``found``'s, and ``found`` must hold every group (no ``top``).
    """
    fields = group_fields(by)
    if found.top is not None or not set(fields) <= set(found.fields):
        raise ValueError(f"cannot roll spend by {found.by} (top {found.top}) up to {by}")
    positions = [found.fields.index(name) for name in fields]
    grouped: dict[tuple[str | None, ...], list[SpendRow]] = defaultdict(list)
    for row in found.groups:
        grouped[tuple(row.key[position] for position in positions)].append(row)
    groups = [replace(total(rows), key=key) for key, rows in sorted(grouped.items(), key=_order)]
    return replace(found, by=by, fields=fields, groups=groups)


def _order(item: tuple[tuple[str | None, ...], Any]) -> tuple[tuple[bool, str], ...]:
    return tuple((part is not None, part or "") for part in item[0])


def spend_query(
    fields: tuple[str, ...],
    since: date | None,
    until: date | None,
    *,
    dialect: str,
    include_eval: bool = False,
    only: Only = Only(),
) -> Select[Any]:
    """One statement: partial sums in an inner query, summed again per group.

    The inner query is a UNION ALL of two aggregates: calls, tokens and money
    read from ix_model_calls_spend, and escalated calls read from the partial
    index ix_model_calls_escalated. Being one statement, both read the same
    snapshot. SQLite has no hash aggregation: it sorts every row of a GROUP BY
    that does not follow an index. There the inner query groups by the
    shortest prefix of the index's columns that holds the fields asked for,
    so it streams the index in order, and the outer query sorts a few
    thousand partial rows. PostgreSQL hashes, so it groups by the fields.

    A version is the one its run declared. Ledger rows hold the workflow's
    content hash, and the content includes the version, so each (workflow,
    hash) maps to one version (ix_runs_versions); an unknown hash gives null.
    Both indexes hold the eval mark, so leaving eval calls out reads them alone too.

    A tag is its run's: grouped by one, the partial sums are per run, joined to
    the runs' tags (no index holds them: slower on a long ledger).
    """
    needed = _needed(fields)
    by_index = dialect == "sqlite" and "run_id" not in needed
    inner = PARTIAL_KEYS[: 1 + max(map(PARTIAL_KEYS.index, needed))] if by_index else needed
    partials = union_all(
        _within(_sums(inner), since, until, include_eval, only),
        _within(_escalations(inner), since, until, include_eval, only),
    ).subquery("partials")
    columns: dict[str, ColumnElement[Any]] = {name: partials.c[name] for name in inner}
    source: FromClause = partials
    if "workflow_version" in fields:
        source, columns["workflow_version"] = _with_versions(partials)
    if "run_id" in needed:
        source = source.join(runs, runs.c.id == partials.c.run_id)
        for name in fields:
            if name.startswith("tag:"):
                columns[name] = runs.c.tags[name[4:]].as_string()
    keys = [columns[name] for name in fields]
    return (
        select(
            *keys,
            func.sum(partials.c.calls),
            func.sum(partials.c.escalated_calls),
            func.sum(partials.c.prompt_tokens),
            func.sum(partials.c.completion_tokens),
            func.sum(partials.c.cost_usd, type_=Money),
            func.coalesce(func.sum(partials.c.reference_cost_usd), 0, type_=Money),
            func.coalesce(func.sum(partials.c.local_cost_usd), 0, type_=Money),
            func.coalesce(func.sum(partials.c.simulated_cost_usd), 0, type_=Money),
        )
        .select_from(source)
        .group_by(*keys)
        .order_by(*keys)
    )


def _with_versions(partials: Subquery) -> tuple[FromClause, ColumnElement[Any]]:
    """``partials`` joined to the version each (workflow, content hash) declared."""
    versions = (
        select(
            runs.c.workflow,
            runs.c.workflow_hash,
            func.max(runs.c.workflow_version).label("workflow_version"),
        )
        .group_by(runs.c.workflow, runs.c.workflow_hash)
        .subquery("versions")
    )
    joined = partials.outerjoin(
        versions,
        and_(
            versions.c.workflow == partials.c.workflow,
            versions.c.workflow_hash == partials.c.workflow_hash,
        ),
    )
    return joined, versions.c.workflow_version


def _needed(fields: tuple[str, ...]) -> tuple[str, ...]:
    """The ledger columns that key ``fields``: a version is found from the content hash."""
    names: list[str] = []
    for asked in fields:
        if asked.startswith("tag:"):
            asked = "run_id"
        for name in ("workflow", "workflow_hash") if asked == "workflow_version" else (asked,):
            if name not in names:
                names.append(name)
    return tuple(names)


def _sums(keys: tuple[str, ...]) -> Select[Any]:
    columns = [model_calls.c[name] for name in keys]
    return select(
        *columns,
        func.sum(case((_IS_CALL, 1), else_=0)).label("calls"),
        _NONE.label("escalated_calls"),
        func.sum(model_calls.c.prompt_tokens).label("prompt_tokens"),
        func.sum(model_calls.c.completion_tokens).label("completion_tokens"),
        func.sum(model_calls.c.cost_usd).label("cost_usd"),
        func.sum(model_calls.c.reference_cost_usd).label("reference_cost_usd"),
        func.sum(case((model_calls.c.local.is_(True), model_calls.c.cost_usd), else_=0)).label(
            "local_cost_usd"
        ),
        func.sum(case((model_calls.c.simulated.is_(True), model_calls.c.cost_usd), else_=0)).label(
            "simulated_cost_usd"
        ),
    ).group_by(*columns)


def _escalations(keys: tuple[str, ...]) -> Select[Any]:
    columns = [model_calls.c[name] for name in keys]
    return (
        select(
            *columns,
            _NONE.label("calls"),
            func.count().label("escalated_calls"),
            *(
                _NONE.label(name)
                for name in (
                    "prompt_tokens",
                    "completion_tokens",
                    "cost_usd",
                    "reference_cost_usd",
                    "local_cost_usd",
                    "simulated_cost_usd",
                )
            ),
        )
        .where(model_calls.c.escalation_reason.is_not(None), _IS_CALL)
        .group_by(*columns)
    )


def _within(
    query: Select[Any], since: date | None, until: date | None, include_eval: bool, only: Only
) -> Select[Any]:
    for column, value in (
        ("workflow", only.workflow),
        ("step_id", only.step),
        ("model", only.model),
    ):
        if value is not None:
            query = query.where(model_calls.c[column] == value)
    if only.tags:
        tagged = select(runs.c.id).where(
            *(runs.c.tags[key].as_string() == value for key, value in only.tags)
        )
        query = query.where(model_calls.c.run_id.in_(tagged))
    if not include_eval:
        query = query.where(model_calls.c.eval.is_(None))
    if since is not None:
        query = query.where(model_calls.c.day >= since)
    if until is not None:
        query = query.where(model_calls.c.day <= until)
    return query


def _row(row: Any, width: int) -> SpendRow:
    calls, escalated, prompt, completion, cost, reference, local, simulated = row[width:]
    return SpendRow(
        key=tuple(_key_part(part) for part in row[:width]),
        calls=int(calls),
        escalated_calls=int(escalated),
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
        cost_usd=cost or Decimal(0),
        reference_cost_usd=reference or Decimal(0),
        local_cost_usd=local or Decimal(0),
        simulated_cost_usd=simulated or Decimal(0),
    )


def _key_part(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, date) else str(value)
