"""Costs: each ledger row equals litellm's price table for its tokens; reports add up to the rows."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator import reports
from orchestrator.models.litellm import import_litellm
from orchestrator.pricing import litellm_price
from orchestrator.store import open_engine
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def table_price(model: str) -> tuple[Decimal, Decimal]:
    entry = import_litellm().model_cost[model.split("/", 1)[1]]
    return Decimal(str(entry["input_cost_per_token"])), Decimal(str(entry["output_cost_per_token"]))


@pytest.fixture
def priced(
    tmp_path: Path, database_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> Project:
    open_engine(database_url, migrate=True).dispose()
    project = Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier),
            "database": database_url,
            "prices": {"ollama/llama3.2:1b": {"input": "0.02", "output": "0.04"}},
        },
    )
    project.workflow(
        {
            "name": "mixed",
            "steps": [
                {"id": "cheap", "agent": "helper", "tier": "light"},
                {"id": "dear", "agent": "helper", "tier": "frontier", "needs": ["cheap"]},
                {
                    "id": "escalated",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["cheap"],
                    "output": {"type": "object"},
                },
            ],
        }
    )
    return project


def test_each_row_costs_what_litellms_table_says(
    priced: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ollama.responder = lambda body: Reply(
        text="not an object" if body.get("format") else "fine",
        prompt_tokens=1234,
        completion_tokens=567,
    )
    frontier.responder = lambda body: Reply(
        text='{"ok": true}', prompt_tokens=98765, completion_tokens=4321
    )
    for _ in range(3):
        assert priced.run("mixed").status == "succeeded"
    litellm = import_litellm()
    ref_in, ref_out = table_price("openai/gpt-4.1")
    rows = []
    store = priced.store()
    for run in store.runs():
        found = store.run(run["id"])
        assert found is not None
        rows.extend(found["calls"])
    assert {r["model"] for r in rows} == {"ollama/llama3.2:1b", "openai/gpt-4o-mini"}
    for row in rows:
        if row["model"] == "openai/gpt-4o-mini":
            price_in, price_out = table_price(row["model"])
            floats = litellm.cost_per_token(
                model="gpt-4o-mini",
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
            )
            assert abs(float(row["cost_usd"]) - sum(floats)) < 1e-9
        else:  # the override: USD per 1M tokens
            price_in, price_out = Decimal("0.02") / 10**6, Decimal("0.04") / 10**6
        assert (
            row["cost_usd"]
            == price_in * row["prompt_tokens"] + price_out * row["completion_tokens"]
        )
        # Only the accepted answer carries the all-frontier counterfactual.
        if row["outcome"] == "ok":
            assert (
                row["reference_cost_usd"]
                == ref_in * row["prompt_tokens"] + ref_out * row["completion_tokens"]
            )
        else:
            assert row["outcome"] == "invalid_output" and row["reference_cost_usd"] is None

    # Every grouping's total equals the sum of the ledger rows, to the pico-dollar.
    row_total = sum((r["cost_usd"] for r in rows), Decimal(0))
    reference_total = sum((r["reference_cost_usd"] or Decimal(0) for r in rows), Decimal(0))
    assert row_total > 0
    for by in reports.GROUPS:
        groups = reports.spend(store.engine, by=by)
        overall = reports.total(groups)
        assert overall.cost_usd == row_total, by
        assert overall.reference_cost_usd == reference_total, by
        assert overall.calls == len(rows), by
        assert overall.prompt_tokens == sum(r["prompt_tokens"] for r in rows), by
    by_step = {row.key: row for row in reports.spend(store.engine, by="step")}
    dear = [r for r in rows if r["step_id"] == "dear"]
    assert by_step[("mixed", "dear")].cost_usd == sum(r["cost_usd"] for r in dear)
    store.engine.dispose()


def test_local_models_cost_nothing_unless_priced(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(tmp_path, {"tiers": tiers_for(ollama, frontier)})
    project.workflow({"name": "free", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    ollama.reply(Reply(text="x", prompt_tokens=500, completion_tokens=500))
    result = project.run("free")
    [call] = project.calls(result.run_id)
    assert call["cost_usd"] == 0
    assert call["reference_cost_usd"] == Decimal("0.005")  # 500 × $2/M + 500 × $8/M on gpt-4.1


def test_prices_are_read_without_importing_litellm() -> None:
    import subprocess
    import sys

    code = "import sys; from orchestrator.pricing import litellm_price; print(litellm_price('openai/gpt-4.1')); print('litellm' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-1] == "False"
    assert litellm_price("openai/gpt-4.1") is not None


def _spent(project: Project) -> dict[str, Any]:
    shown = tierflow("spend", "--format", "json", cwd=project.root)
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout)["total"])


def test_the_counterfactual_is_one_reference_call_with_the_accepted_answers_tokens(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "one",
            "steps": [
                {"id": "only", "agent": "helper", "tier": "light", "output": {"type": "object"}}
            ],
        }
    )
    ollama.reply(Reply(text="not an object", prompt_tokens=5000, completion_tokens=5000))
    frontier.reply(Reply(text='{"ok": true}', prompt_tokens=100, completion_tokens=10))
    result = project.run("one")
    assert result.status == "succeeded"
    ref_in, ref_out = table_price("openai/gpt-4.1")
    answered = ref_in * 100 + ref_out * 10  # the accepted answer's tokens, on the reference
    calls = project.calls(result.run_id)
    assert [c["reference_cost_usd"] for c in calls] == [None, answered]
    total = _spent(project)
    assert Decimal(total["reference_cost_usd"]) == answered
    assert Decimal(total["savings_usd"]) == answered - Decimal(total["cost_usd"])


def test_a_failed_run_claims_no_savings(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "one",
            "steps": [
                {"id": "only", "agent": "helper", "tier": "light", "output": {"type": "object"}}
            ],
        }
    )
    ollama.default = Reply(text="not an object")
    frontier.default = Reply(text="nor this", prompt_tokens=100, completion_tokens=10)
    result = project.run("one")
    assert result.status == "failed"
    total = _spent(project)
    assert Decimal(total["cost_usd"]) > 0
    assert Decimal(total["savings_usd"]) == 0
    for call in project.calls(result.run_id):
        assert call["reference_cost_usd"] == call["cost_usd"]
