"""Streamed calls: the same tokens and cost as plain calls, and the worst case when cut off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tiers_for

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

PRICES = {
    "openai/gpt-4o-mini": {"input": 1000, "output": 2000},
    "ollama/llama3.2:1b": {"input": 100, "output": 200},
}
ANSWER = "the quick brown fox jumps over the lazy dog"


def streaming_project(
    root: Path, ollama: OllamaServer, frontier: OpenAIServer, tier: str, *, stream: bool
) -> Project:
    tiers = tiers_for(ollama, frontier)
    for entry in tiers[tier]["models"]:
        entry["stream"] = stream
    project = Project(root, {"tiers": tiers, "prices": PRICES})
    project.workflow({"name": "say", "steps": [{"id": "say", "agent": "helper", "tier": tier}]})
    return project


def only_call(project: Project, run_id: str) -> dict[str, Any]:
    [call] = project.calls(run_id)
    return call


@pytest.mark.parametrize("tier", ["light", "frontier"])
def test_streamed_and_plain_calls_record_the_same_usage_and_cost(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, tier: str
) -> None:
    scripted = Reply(text=ANSWER, prompt_tokens=21, completion_tokens=9)
    ollama.responder = frontier.responder = lambda body: scripted
    calls = []
    for stream in (False, True):
        project = streaming_project(tmp_path / str(stream), ollama, frontier, tier, stream=stream)
        result = project.run("say")
        assert result.status == "succeeded" and result.outputs == {"say": ANSWER}, result.error
        calls.append(only_call(project, result.run_id))
    plain, streamed = calls
    fields = ("prompt_tokens", "completion_tokens", "cost_usd", "reference_cost_usd")
    assert {f: streamed[f] for f in fields} == {f: plain[f] for f in fields}
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (21, 9)
    assert plain["cost_usd"] > 0
    requests = (ollama if tier == "light" else frontier).chat_requests()
    assert [bool(r.get("stream")) for r in requests] == [False, True]


@pytest.mark.parametrize("tier", ["light", "frontier"])
def test_a_stream_cut_midway_keeps_its_worst_case(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, tier: str
) -> None:
    cut = Reply(text=ANSWER, prompt_tokens=21, completion_tokens=9, abort_after=4)
    ollama.responder = frontier.responder = lambda body: cut
    project = streaming_project(tmp_path / "p", ollama, frontier, tier, stream=True)
    result = project.run("say")
    call = project.calls(result.run_id)[0]
    assert call["outcome"] == "error" and "the stream broke after 4 chunks" in call["error"]
    # Four words arrived, but the provider may have generated more before it
    # noticed, and reported nothing: the call keeps its worst case, never less.
    assert call["completion_tokens"] == 64  # the agent's max_tokens
    assert call["prompt_tokens"] > 0 and call["cost_usd"] > 0
    assert (call["state"], call["usage_source"]) == ("settled", "worst_case")
    if tier == "frontier":  # nothing above it to escalate to
        assert result.status == "failed"
