"""Opt-in traces: what each call was sent and got back, secrets masked, for
tierflow show --trace and the API; never for sensitive steps unless they say so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

SECRET = "zq-a-key-that-must-never-be-stored-0123"


def traced_project(
    root: Path, ollama: OllamaServer, frontier: OpenAIServer, *, trace: bool, step: dict[str, Any]
) -> Project:
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["models"][0]["api_key_env"] = "FRONTIER_KEY"
    project = Project(root, {"tiers": tiers, "trace": trace})
    project.workflow(
        {
            "name": "short",
            "steps": [
                {
                    "id": "say",
                    "agent": "helper",
                    "tier": "light",
                    "checks": ["output | wordcount <= 3"],
                    **step,
                }
            ],
        }
    )
    return project


def traces_of(project: Project, run_id: str) -> list[dict[str, Any]]:
    shown = tierflow("show", run_id, "--json", cwd=project.root)
    assert shown.returncode == 0, shown.stderr
    return list(json.loads(shown.stdout)["traces"])


def test_a_traced_step_keeps_the_rejected_answer_and_masks_secrets(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRONTIER_KEY", SECRET)
    project = traced_project(tmp_path / "p", ollama, frontier, trace=True, step={})
    ollama.reply(Reply(text="this answer is far too long to pass"))
    frontier.reply(Reply(text="short and fine"))
    result = project.run("short", {"text": f"say hi; my key is {SECRET}"})
    assert result.status == "succeeded", result.error

    rejected, accepted = traces_of(project, result.run_id)
    assert rejected["answer"] == "this answer is far too long to pass"
    assert accepted["answer"] == "short and fine"
    sent = rejected["messages"][-1]["content"]
    assert sent.startswith("say hi; my key is ") and SECRET not in sent
    shown = tierflow("show", result.run_id, "--trace", cwd=project.root)
    assert "< answer:" in shown.stdout and "this answer is far too long to pass" in shown.stdout
    assert SECRET not in shown.stdout
    plain = tierflow("show", result.run_id, cwd=project.root)
    assert "far too long" not in plain.stdout  # traces only when asked for


@pytest.mark.parametrize(
    ("trace", "step", "kept"),
    [
        (False, {}, 0),  # off by default
        (True, {"trace": False}, 0),  # a step turns it off
        (False, {"trace": True}, 1),  # a step turns it on
        (True, {"sensitive": True}, 0),  # never for a sensitive step...
        (True, {"sensitive": True, "trace": {"sensitive": True}}, 1),  # ...unless it says so
    ],
)
def test_who_is_traced(
    tmp_path: Path,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    trace: bool,
    step: dict[str, Any],
    kept: int,
) -> None:
    project = traced_project(tmp_path / "p", ollama, frontier, trace=trace, step=step)
    ollama.reply(Reply(text="fine"))
    result = project.run("short")
    assert result.status == "succeeded", result.error
    assert len(traces_of(project, result.run_id)) == kept
    shown = tierflow("show", result.run_id, "--trace", cwd=project.root)
    assert ("no traces: this run's calls were not traced" in shown.stdout) == (kept == 0)
