"""An answer cut at max_tokens is its own outcome, `truncated`: it names max_tokens,
and climbs the ladder only when escalation.on lists it. Through the real ollama and
litellm clients, streamed and not, against loopback servers that say "length"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

CUT = Reply(text="The answer starts well and then", completion_tokens=7, truncated=True)


def cut_project(
    root: Path,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    *,
    stream: bool,
    on: list[str] | None = None,
) -> Project:
    tiers: dict[str, Any] = tiers_for(ollama, frontier)
    for tier in tiers.values():
        for entry in tier["models"]:
            entry["stream"] = stream
    config: dict[str, Any] = {"tiers": tiers}
    if on is not None:
        config["escalation"] = {"on": on}
    project = Project(root, config)
    project.workflow(
        {
            "name": "say",
            "steps": [{"id": "say", "agent": "helper", "tier": "light", "max_tokens": 7}],
        }
    )
    return project


@pytest.mark.parametrize("stream", [False, True])
def test_a_cut_answer_fails_the_step_and_names_max_tokens(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, stream: bool
) -> None:
    project = cut_project(tmp_path / "p", ollama, frontier, stream=stream)
    ollama.reply(CUT)
    result = project.run("say")
    assert result.status == "failed"
    assert "cut at max_tokens 7 (finish reason length)" in (result.error or "")
    [call] = project.calls(result.run_id)
    assert call["outcome"] == "truncated" and "raise max_tokens" in call["error"]
    assert call["completion_tokens"] == 7  # its tokens are still counted
    assert frontier.requests == []  # by default, a config problem does not buy a frontier call

    ollama.reply(CUT)
    ran = tierflow("run", "say", cwd=project.root)
    assert ran.returncode == 1
    # The attempt's line says why; the step's line adds only what it does not.
    assert ran.stdout.count("cut at max_tokens 7") == 1, ran.stdout
    assert "    truncated and escalation.on excludes it\n" in ran.stdout


@pytest.mark.parametrize("stream", [False, True])
def test_a_cut_answer_climbs_when_escalation_on_lists_truncated(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, stream: bool
) -> None:
    project = cut_project(
        tmp_path / "p", ollama, frontier, stream=stream, on=["error", "truncated"]
    )
    ollama.reply(CUT)
    frontier.reply(CUT, Reply(text="Whole."))  # the frontier model's cut answer climbs no further
    result = project.run("say")
    assert result.status == "failed"
    assert [c["outcome"] for c in project.calls(result.run_id)] == ["truncated", "truncated"]

    ollama.reply(CUT)
    result = project.run("say")
    assert result.status == "succeeded", result.error
    assert result.outputs["say"] == "Whole."
    first, second = project.calls(result.run_id)
    assert (first["outcome"], second["outcome"]) == ("truncated", "ok")
    assert "max_tokens 7" in second["escalation_reason"]


def test_truncated_is_a_known_escalation_outcome(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    from conftest import tierflow

    project = cut_project(tmp_path / "p", ollama, frontier, stream=False, on=["trunkated"])
    proc = tierflow("validate", "workflows/say.yaml", cwd=project.root)
    assert proc.returncode == 2
    assert "did you mean 'truncated'" in proc.stderr
