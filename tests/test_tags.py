"""A run's tags (-t team=growth, tags in POST /runs), and spend grouped and
filtered by tag, workflow, step and model, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from conftest import PRICES, Project, tierflow, tiers_for

from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def tagged_project(
    root: Path, database_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> Project:
    project = Project(
        root,
        {"tiers": tiers_for(ollama, frontier), "prices": PRICES, "database": database_url},
    )
    for name in ("ask", "tell"):
        project.workflow(
            {"name": name, "steps": [{"id": "answer", "agent": "helper", "tier": "frontier"}]}
        )
    upgraded = tierflow("db", "upgrade", cwd=root)  # PostgreSQL is migrated on purpose
    assert upgraded.returncode == 0, upgraded.stderr
    return project


def spend(project: Project, *args: str) -> dict[str, Any]:
    proc = tierflow("spend", "--json", *args, cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_spend_groups_and_filters_by_tag_workflow_step_and_model(
    tmp_path: Path, database_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = tagged_project(tmp_path / "p", database_url, ollama, frontier)
    frontier.responder = lambda body: Reply(text="ok", prompt_tokens=10, completion_tokens=5)
    for workflow, tags in (
        ("ask", {"team": "growth", "env": "prod"}),
        ("ask", {"team": "growth"}),
        ("tell", {"team": "ops"}),
        ("tell", None),
    ):
        runner, loaded, store = project.runner(workflow)
        try:
            result = asyncio.run(runner.run(loaded, {}, tags=tags))
        finally:
            store.engine.dispose()
        assert result.status == "succeeded", result.error
    one = Decimal(spend(project, "--workflow", "tell", "--tag", "team=ops")["total"]["cost_usd"])
    assert one > 0  # each run made one call of the same size: one call's cost

    by_team = {g["tag:team"]: g for g in spend(project, "--by", "tag:team")["groups"]}
    assert {team: g["calls"] for team, g in by_team.items()} == {None: 1, "growth": 2, "ops": 1}
    assert Decimal(by_team["growth"]["cost_usd"]) == 2 * one

    growth = spend(project, "--tag", "team=growth")
    assert growth["total"]["calls"] == 2
    both = spend(project, "--tag", "team=growth", "--tag", "env=prod", "--by", "tag:env")
    assert [(g["tag:env"], g["calls"]) for g in both["groups"]] == [("prod", 1)]
    assert spend(project, "--workflow", "tell")["total"]["calls"] == 2
    assert (
        spend(project, "--step", "answer", "--model", "openai/gpt-4o-mini")["total"]["calls"] == 4
    )
    assert spend(project, "--model", "openai/gpt-4.1")["total"]["calls"] == 0

    [newest, *_] = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)
    assert newest["tags"] is None
    shown = tierflow("show", newest["id"], cwd=project.root)
    assert "tags " not in shown.stdout


def test_tags_are_checked_and_shown(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = tagged_project(tmp_path / "p", f"sqlite:///{tmp_path / 'l.db'}", ollama, frontier)
    for bad, said in (
        (["-t", "Team=x"], "tag 'Team': a tag's name is lower case"),
        (["-t", "team"], "tag 'team': expected key=value"),
        (["-t", f"team={'x' * 101}"], "its value must be text of at most 100 characters"),
    ):
        proc = tierflow("run", "ask", *bad, cwd=project.root)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    assert frontier.requests == []
    frontier.reply("fine")
    ran = json.loads(tierflow("run", "ask", "-t", "team=growth", "--json", cwd=project.root).stdout)
    shown = tierflow("show", ran["run_id"], cwd=project.root)
    assert "tags  team=growth" in shown.stdout
    bad_by = tierflow("spend", "--by", "tag:Team", cwd=project.root)
    assert bad_by.returncode == 2 and "name a tag, like tag:team" in bad_by.stderr
