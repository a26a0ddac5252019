"""Spend reports on SQLite and PostgreSQL: every grouping adds up to the ledger rows exactly."""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import make_call, make_step, seed_ledger, tierflow
from sqlalchemy import select

from orchestrator import reports
from orchestrator.errors import UserError
from orchestrator.store import Store, open_engine
from orchestrator.store.tables import model_calls, runs

GROUPINGS = [*reports.GROUPS, "day,workflow", "tier,model", "version,day"]


def ledger(store: Store) -> list[dict[str, Any]]:
    """Every ledger row, with its run's workflow version."""
    query = select(model_calls, runs.c.workflow_version).join(
        runs, runs.c.id == model_calls.c.run_id
    )
    with store.engine.connect() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's measures, worked out in Python from the rows themselves."""
    calls = [row for row in rows if row["outcome"] != "unavailable"]
    return {
        "calls": len(calls),
        "escalated_calls": sum(1 for row in calls if row["escalation_reason"]),
        "prompt_tokens": sum(row["prompt_tokens"] for row in rows),
        "completion_tokens": sum(row["completion_tokens"] for row in rows),
        "cost_usd": sum((row["cost_usd"] for row in rows), Decimal(0)),
        "reference_cost_usd": sum((row["reference_cost_usd"] or 0 for row in rows), Decimal(0)),
    }


def measured(row: reports.SpendRow) -> dict[str, Any]:
    return {
        "calls": row.calls,
        "escalated_calls": row.escalated_calls,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "cost_usd": row.cost_usd,
        "reference_cost_usd": row.reference_cost_usd,
    }


def key_of(row: dict[str, Any], fields: tuple[str, ...]) -> tuple[str | None, ...]:
    parts = (row[field] for field in fields)
    return tuple(None if part is None else str(part) for part in parts)


@pytest.mark.parametrize("by", GROUPINGS)
def test_every_group_and_total_equal_the_ledger_rows(store: Store, by: str) -> None:
    seed_ledger(store)
    rows = ledger(store)
    fields = reports.group_fields(by)
    expected: dict[tuple[str | None, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        expected[key_of(row, fields)].append(row)

    found = reports.report(store.engine, by=by)
    assert {row.key: measured(row) for row in found.groups} == {
        key: figures(group) for key, group in expected.items()
    }
    assert measured(found.total) == figures(rows)
    assert found.total.cost_usd == Decimal("5.500123456793") + 6 * Decimal("0.000001")


def test_escalation_rate_counts_calls_made_above_the_first_tier(store: Store) -> None:
    seed_ledger(store)
    by_tier = {row.key: row for row in reports.spend(store.engine, by="tier")}
    # Each run: classify (light, ok), answer light (ok) → standard skipped → frontier.
    assert by_tier[("light",)].calls == 12 and by_tier[("light",)].escalated_calls == 0
    assert by_tier[("frontier",)].escalation_rate == 1.0
    assert ("standard",) in by_tier and by_tier[("standard",)].calls == 0  # unavailable only
    overall = reports.report(store.engine).total
    assert (overall.calls, overall.escalated_calls) == (18, 6)
    assert overall.escalation_rate == pytest.approx(1 / 3)
    step = {row.key: row for row in reports.spend(store.engine, by="step")}
    assert step[("triage", "answer")].escalation_rate == 0.5
    assert step[("triage", "classify")].escalation_rate == 0.0


def test_versions_come_from_the_run_and_unversioned_stays_null(store: Store) -> None:
    seed_ledger(store)
    found = reports.report(store.engine, by="version").as_dict()
    keys = [(group["workflow"], group["workflow_version"]) for group in found["groups"]]
    assert keys == [("<b>report</b> 'x'", None), ("triage", "1"), ("triage", "2")]


def test_top_keeps_the_dearest_steps_and_the_whole_total(store: Store) -> None:
    seed_ledger(store)
    everything = reports.report(store.engine, by="step")
    found = reports.report(store.engine, top=2)
    assert found.by == "step"
    assert [row.key for row in found.groups] == [
        ("<b>report</b> 'x'", "answer"),
        ("triage", "answer"),
    ]
    assert found.groups[0].cost_usd >= found.groups[1].cost_usd
    assert found.total == everything.total
    with pytest.raises(UserError, match="--top 0"):
        reports.report(store.engine, top=0)


@pytest.mark.parametrize(("by", "to"), [("day,workflow", "workflow"), ("version,day", "version")])
def test_a_rollup_is_the_coarser_report(store: Store, by: str, to: str) -> None:
    seed_ledger(store)
    rolled = reports.rollup(reports.report(store.engine, by=by), to)
    direct = reports.report(store.engine, by=to)
    assert (rolled.by, rolled.fields, rolled.total) == (direct.by, direct.fields, direct.total)
    assert {row.key: row for row in rolled.groups} == {row.key: row for row in direct.groups}
    with pytest.raises(ValueError, match="cannot roll"):
        reports.rollup(direct, "tier")


def test_since_and_until_bound_the_days_inclusively(store: Store) -> None:
    seed_ledger(store)
    today = datetime.now(UTC).date()
    rows = ledger(store)
    window = [
        row for row in rows if today - timedelta(days=5) <= row["day"] <= today - timedelta(days=1)
    ]
    found = reports.report(
        store.engine, by="day", since=today - timedelta(days=5), until=today - timedelta(days=1)
    )
    assert [row.key[0] for row in found.groups] == [
        (today - timedelta(days=n)).isoformat() for n in (5, 2, 1)
    ]
    assert measured(found.total) == figures(window)
    assert reports.parse_when("30d") == today - timedelta(days=30)
    # Before the year 1, and past int()'s digit limit: were "internal error".
    for beyond in ("999999999d", "9" * 5000 + "d"):
        with pytest.raises(UserError, match="within the years 1 to 9999"):
            reports.parse_when(beyond)
    assert reports.parse_when("2026-01-31", end=True) == datetime(2026, 1, 31).date()


@pytest.mark.parametrize(
    ("by", "message"),
    [
        ("colour", "choose one of workflow, step, tier, model, day, version"),
        ("day,modle", "--by 'modle'"),
        ("day,modle", "did you mean 'model'?"),
        ("", "--by ''"),
    ],
)
def test_an_unknown_grouping_is_named(by: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        reports.group_fields(by)


def test_cli_json_and_csv_are_the_report(store: Store, tmp_path: Path) -> None:
    seed_ledger(store)
    url = store.engine.url.render_as_string(hide_password=False)
    config = tmp_path / "tierflow.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": url,
                "tiers": {"light": {"models": ["llamacpp/smollm2-135m"], "local": True}},
            }
        )
    )

    def spend(*args: str) -> subprocess.CompletedProcess[str]:
        return tierflow("spend", "--config", str(config), *args, cwd=tmp_path)

    for args, by, top in (
        (["--by", "version", "--json"], "version", None),
        (["--top", "3", "--format", "json"], None, 3),
        (["--by", "day,workflow", "--since", "7d", "--json"], "day,workflow", None),
    ):
        proc = spend(*args)
        assert proc.returncode == 0, proc.stderr
        since = reports.parse_when("7d") if "--since" in args else None
        expected = reports.report(store.engine, by=by, since=since, top=top).as_dict()
        assert json.loads(proc.stdout) == json.loads(json.dumps(expected))
    table = spend("--top", "2")
    assert table.returncode == 0, table.stderr
    assert "spend by step, dearest 2" in table.stdout and "escalated" in table.stdout
    assert "50.0%" in table.stdout  # each answer step: one of its two calls escalated
    csv_lines = spend("--by", "tier", "--format", "csv").stdout.splitlines()
    assert csv_lines[0].startswith("tier_used,calls,escalated_calls,escalation_rate,")
    assert len(csv_lines) == 1 + 3


def test_a_call_whose_hash_no_run_declared_has_no_version(store: Store) -> None:
    seed_ledger(store)
    stray = make_step("stray", [make_call(1, "0.5")])
    store.record_step(run_id="run000" + "0" * 26, workflow="triage", content_hash="x", record=stray)
    found = reports.report(store.engine, by="version")
    versions = {row.key: row.cost_usd for row in found.groups}
    assert versions[("triage", None)] == Decimal("0.5")
    assert found.total.cost_usd == sum(row["cost_usd"] for row in ledger(store))


@pytest.mark.parametrize("by", GROUPINGS)
@pytest.mark.parametrize("since", [None, date(2026, 1, 1)])
def test_sqlite_reports_read_indexes_never_the_whole_table(
    tmp_path: Path, by: str, since: date | None
) -> None:
    """A million-row ledger stays under a second only while no report scans the table."""
    engine = open_engine(f"sqlite:///{tmp_path / 'plan.db'}", migrate=True)
    query = reports.spend_query(reports.group_fields(by), since, None, dialect="sqlite")
    sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as connection:
        plan = [row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
    engine.dispose()
    reads = [step for step in plan if "model_calls" in step or "runs" in step.split()]
    assert reads and all("INDEX" in step for step in reads), plan
    if since is None:
        assert any("COVERING INDEX ix_model_calls_spend" in step for step in reads), plan


def test_money_is_a_plain_decimal_in_json_and_csv() -> None:
    """Decimal arithmetic keeps exponents (0 × 1.5E-7 is 0E-8): what a user reads never does."""
    from orchestrator.encoding import dumps

    zero = Decimal(0) * Decimal("1.5E-7")
    assert str(zero) == "0E-8"
    row = reports.SpendRow(
        key=("hello",),
        calls=1,
        escalated_calls=0,
        prompt_tokens=3,
        completion_tokens=0,
        cost_usd=zero,
        reference_cost_usd=Decimal("2.50E-5"),
    )
    figures = row.figures()
    assert (figures["cost_usd"], figures["reference_cost_usd"]) == ("0", "0.000025")
    assert json.loads(dumps({"cost_usd": zero, "tiny": Decimal("1E-12")})) == {
        "cost_usd": "0",
        "tiny": "0.000000000001",
    }
