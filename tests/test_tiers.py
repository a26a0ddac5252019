"""Tier-affine execution: a runner serving some tiers hands a run to the queue of another."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tiers_for

from orchestrator.runner import RunResult
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


@pytest.fixture
def split(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    """A project whose light and frontier tiers have queues of their own."""
    tiers = tiers_for(ollama, frontier)
    tiers["light"]["queue"] = "gpu"
    tiers["frontier"]["queue"] = "cpu"
    return Project(tmp_path / "p", {"tiers": tiers})


def execute(project: Project, name: str, run_id: str, tiers: list[str]) -> RunResult:
    runner, workflow, store = project.runner(name, tiers=tiers)
    try:
        result = asyncio.run(runner.execute(workflow, run_id))
    finally:
        store.engine.dispose()
    assert result is not None
    return result


def queue_new_run(project: Project, name: str) -> str:
    runner, workflow, store = project.runner(name)
    try:
        return runner.create(workflow, {})
    finally:
        store.engine.dispose()


def run_row(project: Project, run_id: str) -> dict[str, Any]:
    store = project.store()
    try:
        row = store.run_row(run_id)
    finally:
        store.engine.dispose()
    assert row is not None
    return row


def step(id: str, tier: str, **fields: Any) -> dict[str, Any]:
    return {"id": id, "agent": "helper", "tier": tier, "prompt": id, **fields}


def test_a_step_on_another_tier_moves_the_run_to_that_tiers_queue(
    split: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    split.workflow(
        {
            "name": "mixed",
            "steps": [
                step("draft", "light"),
                step("review", "frontier", needs=["draft"]),
                step("polish", "light", needs=["review"]),
            ],
        }
    )
    ollama.responder = lambda body: Reply(text=f"local {body['messages'][-1]['content']}")
    frontier.responder = lambda body: Reply(text="frontier review")
    run_id = queue_new_run(split, "mixed")

    first = execute(split, "mixed", run_id, ["light"])
    assert (first.status, first.queue) == ("queued", "cpu")
    row = run_row(split, run_id)
    assert (row["status"], row["queue"], row["lease_owner"]) == ("queued", "cpu", None)
    assert frontier.chat_requests() == []

    second = execute(split, "mixed", run_id, ["frontier"])
    assert (second.status, second.queue) == ("queued", "gpu")

    third = execute(split, "mixed", run_id, ["light"])
    assert third.status == "succeeded"
    assert third.outputs == {
        "draft": "local draft",
        "review": "frontier review",
        "polish": "local polish",
    }
    prompts = [body["messages"][-1]["content"] for body in ollama.chat_requests()]
    assert prompts == ["draft", "polish"]  # no finished step was asked again
    assert len(frontier.chat_requests()) == 1
    assert [(c["step_id"], c["tier_used"], c["state"]) for c in split.calls(run_id)] == [
        ("draft", "light", "settled"),
        ("review", "frontier", "settled"),
        ("polish", "light", "settled"),
    ]


def test_an_escalation_to_another_tier_continues_where_it_stopped(
    split: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    split.workflow(
        {"name": "checked", "steps": [step("answer", "light", checks=["output == 'yes'"])]}
    )
    ollama.reply("no")
    frontier.reply("yes")
    run_id = queue_new_run(split, "checked")

    moved = execute(split, "checked", run_id, ["light"])
    assert (moved.status, moved.queue) == ("queued", "cpu")
    assert [s.status for s in moved.steps] == ["handed_off"]

    done = execute(split, "checked", run_id, ["frontier"])
    assert done.status == "succeeded" and done.outputs == {"answer": "yes"}
    calls = split.calls(run_id)
    assert [(c["attempt"], c["tier_used"], c["outcome"]) for c in calls] == [
        (1, "light", "invalid_output"),
        (2, "frontier", "ok"),
    ]
    # The frontier call says why the step escalated, though another worker saw it fail.
    assert calls[1]["escalation_reason"].startswith("light/ollama/llama3.2:1b: invalid_output")
    assert len(ollama.chat_requests()) == 1


def test_attempts_used_before_a_hand_off_still_count(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["queue"] = "cpu"
    tiers["frontier"]["models"].append({**tiers["frontier"]["models"][0], "model": "openai/gpt-4o"})
    project = Project(tmp_path / "p", {"tiers": tiers, "escalation": {"max_attempts": 2}})
    project.workflow(
        {"name": "checked", "steps": [step("answer", "light", checks=["output == 'yes'"])]}
    )
    ollama.reply("no")
    frontier.reply(Reply(text="bad request", status=400))
    run_id = queue_new_run(project, "checked")
    assert execute(project, "checked", run_id, ["light"]).status == "queued"

    failed = execute(project, "checked", run_id, ["frontier"])
    assert failed.status == "failed" and "max_attempts 2" in (failed.error or "")
    assert len(frontier.chat_requests()) == 1  # one attempt was left after the light one


def test_a_step_out_of_attempts_fails_where_it_is(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["queue"] = "cpu"
    project = Project(tmp_path / "p", {"tiers": tiers, "escalation": {"max_attempts": 1}})
    project.workflow(
        {"name": "checked", "steps": [step("answer", "light", checks=["output == 'yes'"])]}
    )
    ollama.reply("no")
    run_id = queue_new_run(project, "checked")
    failed = execute(project, "checked", run_id, ["light"])
    assert failed.status == "failed" and "max_attempts 1" in (failed.error or "")
    assert run_row(project, run_id)["status"] == "failed"


def test_running_steps_finish_before_the_run_moves(
    split: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    split.workflow(
        {
            "name": "branches",
            "steps": [
                step("slow", "light"),
                step("deep", "light", checks=["output == 'yes'"]),
            ],
        }
    )
    ollama.responder = lambda body: (
        Reply(text="done slowly", delay_s=0.5)
        if body["messages"][-1]["content"] == "slow"
        else Reply(text="no")
    )
    frontier.reply("yes")
    run_id = queue_new_run(split, "branches")

    # "deep" fails its check on the light tier and must move to the frontier
    # tier, while "slow" is still waiting on its light model.
    moved = execute(split, "branches", run_id, ["light"])
    assert moved.status == "queued"
    assert {s.step_id: s.status for s in moved.steps} == {
        "slow": "succeeded",
        "deep": "handed_off",
    }
    done = execute(split, "branches", run_id, ["frontier"])
    assert done.outputs == {"slow": "done slowly", "deep": "yes"}
    assert sorted((c["step_id"], c["tier_used"], c["state"]) for c in split.calls(run_id)) == [
        ("deep", "frontier", "settled"),
        ("deep", "light", "settled"),
        ("slow", "light", "settled"),
    ]
    assert len(ollama.chat_requests()) == 2


def test_a_runner_for_every_tier_never_hands_off(split: Project, frontier: OpenAIServer) -> None:
    split.workflow({"name": "deep", "steps": [step("deep", "frontier")]})
    frontier.reply("fine")
    assert split.run("deep").status == "succeeded"
