"""Budgets: reservations before every call, refusals in the ledger, downgrades, machine prices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import (
    PRICES,
    Project,
    counters,
    frontier_project,
    killed_mid_call,
    ledger,
    tiers_for,
)
from sqlalchemy import create_engine, func, select, text

from orchestrator.store import open_engine
from orchestrator.store.tables import budget_usage
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

CONCURRENT_RUNS = """
import asyncio, sys
import orchestrator

async def main():
    runs = [orchestrator.arun("ask", {"text": "hi"}, config=sys.argv[1]) for _ in range(int(sys.argv[2]))]
    for result in await asyncio.gather(*runs):
        blocked = "budget_blocked" in (result.error or "")
        print(result.status + (":budget_blocked" if blocked else ""))

asyncio.run(main())
"""


def test_concurrent_runs_never_pass_a_shared_budget(
    tmp_path: Path, database_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    # Each call reports 10 prompt and 5 completion tokens: it costs exactly $0.02.
    # Its reservation is its worst case, several times that, so near the limit
    # runs are refused while others still hold reservations.
    frontier.responder = lambda body: Reply(
        text="fine", delay_s=0.2, prompt_tokens=10, completion_tokens=5
    )
    budget = Decimal("0.5")
    project = frontier_project(
        tmp_path / "p", ollama, frontier, {"daily_usd": str(budget)}, database=database_url
    )
    open_engine(database_url, migrate=True).dispose()
    # 5 processes with 10 runs each in flight at once: reservations race for real.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_RUNS, str(project.config), "10"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    statuses = [status for proc in procs for status in proc.communicate(timeout=120)[0].split()]
    assert len(statuses) == 50, statuses
    succeeded = statuses.count("succeeded")
    refused = statuses.count("failed:budget_blocked")
    assert succeeded + refused == 50, statuses
    assert succeeded and refused  # the limit was reached, and it held
    rows = ledger(project)
    spent = sum((row["cost_usd"] for row in rows), Decimal(0))
    assert spent == Decimal("0.02") * succeeded <= budget
    # Every reservation ended exactly once; refused calls never held one.
    assert sorted({row["state"] for row in rows}) == ["settled"]
    assert sum(row["outcome"] == "ok" for row in rows) == succeeded == len(frontier.chat_requests())
    assert sum(row["outcome"] == "budget_blocked" for row in rows) == refused
    assert all(row["reserved_usd"] is None for row in rows if row["outcome"] == "budget_blocked")
    assert all(row["reserved_usd"] > row["cost_usd"] for row in rows if row["outcome"] == "ok")
    [(key, (counted, reserved))] = counters(project).items()
    assert key.startswith("workflow:ask:day:")
    assert (counted, reserved) == (spent, Decimal(0))


def test_a_refused_call_never_reaches_the_model_and_says_why(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = frontier_project(tmp_path / "p", ollama, frontier, {"per_run_usd": "0.001"})
    result = project.run("ask")
    assert result.status == "failed"
    assert "budget_blocked: the per-run budget of run" in (result.error or "")
    assert "of $0.001000 would be passed: $0 spent, $0 reserved" in (result.error or "")
    assert frontier.chat_requests() == []
    [row] = ledger(project)
    assert (row["outcome"], row["cost_usd"], row["prompt_tokens"]) == ("budget_blocked", 0, 0)


def test_a_global_monthly_budget_counts_every_workflow(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    frontier.responder = lambda body: Reply(text="fine", prompt_tokens=10, completion_tokens=5)
    project = frontier_project(tmp_path / "p", ollama, frontier, {}, budget={"monthly_usd": "0.1"})
    project.workflow(
        {"name": "other", "steps": [{"id": "answer", "agent": "brief", "tier": "frontier"}]}
    )
    results = [project.run(name) for name in ("ask", "other") * 3]
    # Each run reserves its worst case (about $0.07 here) and spends $0.02.
    assert [r.status for r in results[:2]] == ["succeeded", "succeeded"]
    refused = [r for r in results if r.status == "failed"]
    assert refused and all("global monthly budget" in (r.error or "") for r in refused)
    assert {r.workflow for r in results if r.status == "succeeded"} == {"ask", "other"}
    spent = sum((row["cost_usd"] for row in ledger(project)), Decimal(0))
    assert spent <= Decimal("0.1")


def test_past_downgrade_at_steps_run_no_higher_than_the_cap(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    frontier.reply(Reply(text="frontier", prompt_tokens=10, completion_tokens=5))
    ollama.reply("local")
    project = frontier_project(
        tmp_path / "p",
        ollama,
        frontier,
        {"daily_usd": "0.1", "downgrade_at": 0.2, "downgrade_to": "light"},
    )
    first = project.run("ask")  # spends $0.02 of $0.10: below 20% when it starts
    second = project.run("ask")  # starts at 20% used: capped at the light tier
    assert first.outputs == {"answer": "frontier"}
    assert second.outputs == {"answer": "local"}
    assert [(row["tier_asked"], row["tier_used"]) for row in ledger(project)] == [
        ("frontier", "frontier"),
        ("frontier", "light"),
    ]


def test_a_ledger_that_refuses_writes_stops_every_call(
    tmp_path: Path, postgres_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = frontier_project(tmp_path / "p", ollama, frontier, {}, database=postgres_url)
    open_engine(postgres_url, migrate=True).dispose()  # migrated by its owner
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    role = "tierflow_no_ledger_inserts"
    with admin.connect() as connection:
        if not connection.execute(
            text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}
        ).first():
            connection.execute(text(f"CREATE ROLE {role} LOGIN"))
        connection.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
        connection.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
        connection.execute(text(f"REVOKE INSERT ON model_calls FROM {role}"))
    admin.dispose()
    limited = postgres_url.replace("postgres@", f"{role}@", 1)
    assert limited != postgres_url
    project = frontier_project(tmp_path / "q", ollama, frontier, {}, database=limited)
    with pytest.raises(Exception, match="permission denied for table model_calls"):
        project.run("ask")
    assert frontier.chat_requests() == []  # no reservation, no request


def test_a_local_model_priced_per_hour_costs_its_machine_time(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ollama.reply(Reply(text="local", delay_s=0.3))
    project = Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier),
            "prices": {"ollama/llama3.2:1b": {"per_hour": 36}},  # $0.01 a second
        },
    )
    project.workflow({"name": "local", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    assert project.run("local").status == "succeeded"
    [row] = ledger(project)
    assert row["local"] is True
    assert row["latency_ms"] >= 300
    expected = (Decimal("0.01") * Decimal(str(round(row["latency_ms"] / 1000, 6)))).quantize(
        Decimal("1e-12")
    )
    assert row["cost_usd"] == expected.normalize()
    store = project.store()
    try:
        with store.engine.connect() as connection:
            assert connection.execute(select(func.count()).select_from(budget_usage)).scalar() == 0
    finally:
        store.engine.dispose()


def test_a_call_cut_off_by_a_crash_keeps_its_reservation_as_spend(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    frontier.responder = lambda body: Reply(text="slow", delay_s=30)
    project = frontier_project(tmp_path / "p", ollama, frontier, {"daily_usd": "5"}, lease_ttl_s=1)
    killed_mid_call(project, "ask", "answer")
    [(_, (spent, reserved))] = counters(project).items()
    [pending] = ledger(project)
    assert (spent, reserved) == (0, pending["reserved_usd"]) and reserved > 0

    frontier.responder = lambda body: Reply(text="fast", prompt_tokens=10, completion_tokens=5)
    time.sleep(1.2)  # the dead process's lease goes stale
    runner, workflow, store = project.runner("ask")
    try:
        result = asyncio.run(runner.execute(workflow, store.runs()[0]["id"]))
    finally:
        store.engine.dispose()
    assert result is not None and result.status == "succeeded"
    abandoned, settled = ledger(project)
    assert (abandoned["state"], settled["state"]) == ("abandoned", "settled")
    # The cut-off call may have been billed: its worst case stays in the spend.
    assert abandoned["cost_usd"] == abandoned["reserved_usd"] == reserved
    [(_, counted)] = counters(project).items()
    assert counted == (abandoned["cost_usd"] + settled["cost_usd"], 0)


def test_spend_reports_budgets_and_local_cost_apart_from_provider_spend(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    frontier.responder = lambda body: Reply(text="fine", prompt_tokens=10, completion_tokens=5)
    ollama.reply(Reply(text="local", delay_s=0.2))
    project = frontier_project(
        tmp_path / "p",
        ollama,
        frontier,
        {"daily_usd": "1", "monthly_usd": "20"},
        budget={"daily_usd": "3"},
        prices={**PRICES, "ollama/llama3.2:1b": {"per_hour": 36}},
    )
    project.workflow({"name": "local", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    assert project.run("ask").status == "succeeded"
    assert project.run("local").status == "succeeded"
    # Files whose budget does not load are left out of the report, not fatal to it.
    project.write("workflows/negative.yaml", "name: negative\nbudget: {daily_usd: -1}\n")
    project.write("workflows/torn.yaml", "name: [torn\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "spend", "--json", "--config", str(project.config)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    rows = ledger(project)
    local = sum((r["cost_usd"] for r in rows if r["local"]), Decimal(0))
    assert local > 0
    assert Decimal(found["total"]["local_cost_usd"]) == local
    assert Decimal(found["total"]["provider_cost_usd"]) == Decimal("0.02")
    budgets = {b["budget"].split(" for ")[0]: b for b in found["budgets"]}
    assert set(budgets) == {
        "daily budget of workflow 'ask'",
        "monthly budget of workflow 'ask'",
        "global daily budget",
    }
    daily = budgets["daily budget of workflow 'ask'"]
    assert (daily["spent_usd"], daily["reserved_usd"], daily["left_usd"]) == ("0.02", "0", "0.98")
    # The global budget counts both workflows, the local machine time included.
    assert Decimal(budgets["global daily budget"]["spent_usd"]) == Decimal("0.02") + local
