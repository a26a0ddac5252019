"""tierflow run --dry-run: prompts and the worst case before any call; and the
warning, before a real run, of a tier that cannot serve."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from pathlib import Path

from conftest import PRICES, Project, tierflow, tiers_for

from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def priced_project(root: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    project = Project(
        root,
        {
            "tiers": tiers_for(ollama, frontier),
            "prices": PRICES,
            "budget": {"daily_usd": 5},
            "escalation": {"max_attempts": 2},
        },
    )
    project.agent("brief", system="Be brief.", prompt="{{ inputs.text }}", max_tokens=20)
    project.workflow(
        {
            "name": "pair",
            "budget": {"per_run_usd": 1},
            "inputs": {
                "text": {"type": "string", "default": "hello"},
                "words": {"type": "array", "default": ["a", "b", "c"]},
            },
            "steps": [
                {"id": "draft", "agent": "brief", "tier": "light", "prompt": "Say {{ inputs.text }}"},
                {
                    "id": "each",
                    "agent": "brief",
                    "tier": "light",
                    "needs": ["draft"],
                    "for_each": "inputs.words",
                    "prompt": "{{ item }} after {{ steps.draft.output }}",
                    "when": "inputs.words | length > 0",
                    "checks": ["output | length > 0"],
                },
            ],
        }
    )  # fmt: skip
    return project


def test_dry_run_renders_prompts_and_bounds_the_cost_without_a_call(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = priced_project(tmp_path / "p", ollama, frontier)
    proc = tierflow("run", "pair", "-i", "text=hi there", "--dry-run", "--json", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    draft, each = found["steps"]
    assert "[user] Say hi there" in draft["prompt"]
    assert "«item» after «steps.draft.output»" in each["prompt"]
    assert draft["tiers"] == ["light", "frontier"]
    # Two attempts (max_attempts), the frontier one priced; the list's 3 items each.
    assert (draft["calls"], each["calls"], each["per_item"]) == (2, 6, False)
    one = tierflow("run", "pair", "-i", 'words=["a"]', "--dry-run", "--json", cwd=project.root)
    [_, single] = json.loads(one.stdout)["steps"]
    assert Decimal(each["worst_usd"]) == 3 * Decimal(single["worst_usd"]) > 0
    assert Decimal(found["worst_usd"]) == Decimal(draft["worst_usd"]) + Decimal(each["worst_usd"])
    budgets = {b["budget"]: b["limit_usd"] for b in found["budgets"]}
    assert budgets["per-run budget of workflow 'pair'"] == "1"
    assert any(label.startswith("global daily budget") for label in budgets)
    # Nothing was asked, nothing recorded.
    assert ollama.chat_requests() == [] and frontier.requests == []
    assert not (project.root / "tierflow.db").exists()

    assert (each["when"], each["checks"]) == (
        "inputs.words | length > 0",
        ["output | length > 0"],
    )
    shown = tierflow("run", "pair", "--dry-run", cwd=project.root)
    assert "worst case for the run" in shown.stdout and "no model was called" in shown.stdout
    assert "  runs only when: inputs.words | length > 0\n" in shown.stdout
    assert "  its answer must pass: output | length > 0\n" in shown.stdout


def test_the_worst_case_holds_a_real_run_that_climbs_and_spends_its_tokens(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = priced_project(tmp_path / "p", ollama, frontier)
    dry = json.loads(tierflow("run", "pair", "--dry-run", "--json", cwd=project.root).stdout)
    # Every step fails on light and answers on the frontier with all its max_tokens.
    ollama.responder = lambda body: Reply(status=500, text="down")
    frontier.responder = lambda body: Reply(text="word " * 20, completion_tokens=20)
    result = project.run("pair")
    assert result.status == "succeeded", result.error
    spent = sum((Decimal(c["cost_usd"]) for c in project.calls(result.run_id)), Decimal(0))
    assert 0 < spent <= Decimal(dry["worst_usd"])


def test_a_run_says_first_which_tier_cannot_serve(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    tiers = tiers_for(ollama, frontier)
    tiers["hosted"] = {"models": ["anthropic/claude-sonnet-4-5"]}
    project = Project(tmp_path / "p", {"tiers": tiers})
    project.workflow({"name": "one", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    ollama.reply("fine")
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = tierflow("run", "one", cwd=project.root, env=env)
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("tier hosted will be skipped: anthropic/claude-sonnet-4-5:")
    assert "ANTHROPIC_API_KEY not set" in first
