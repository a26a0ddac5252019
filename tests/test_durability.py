"""Crash safety: pending ledger rows, leases, and resuming a run whose process was killed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Project,
    assert_nothing_reserved,
    counters,
    frontier_project,
    kill,
    killed_mid_call,
    ledger,
    make_call,
    start_run,
    tierflow,
    tiers_for,
    wait_for,
    write_two_steps,
)

from orchestrator.client import Client
from orchestrator.queue import execute_by_id
from orchestrator.runner import RunResult
from orchestrator.settings import load_settings
from orchestrator.store.tables import runs
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def resume(project: Project, run_id: str) -> RunResult | None:
    runner, workflow, store = project.runner("two")
    try:
        return asyncio.run(runner.execute(workflow, run_id))
    finally:
        store.engine.dispose()


def test_killed_run_resumes_without_rerunning_finished_steps(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(
        tmp_path, {"tiers": tiers_for(ollama, frontier, timeout_s=30), "lease_ttl_s": 1}
    )
    write_two_steps(project)
    ollama.responder = lambda body: (
        Reply(text="slow", delay_s=30, prompt_tokens=7, completion_tokens=3)
        if body["messages"][-1]["content"] == "second"
        else Reply(text="one", prompt_tokens=5, completion_tokens=2)
    )
    killed_mid_call(project, "two", "second")
    [run] = project.store().runs()
    assert run["status"] == "running"  # what a dead process leaves behind

    ollama.responder = lambda body: Reply(text="two", prompt_tokens=7, completion_tokens=3)
    time.sleep(1.2)  # let the dead process's lease go stale
    result = resume(project, run["id"])
    assert result is not None and result.status == "succeeded"
    assert result.outputs == {"first": "one", "second": "two"}
    prompts = [r["messages"][-1]["content"] for r in ollama.chat_requests()]
    assert prompts.count("first") == 1  # the finished step was not asked again
    assert project.ledger_states() == [
        ("first", 1, "settled"),
        ("second", 1, "abandoned"),
        ("second", 2, "settled"),
    ]
    abandoned = next(c for c in project.calls(run["id"]) if c["state"] == "abandoned")
    # The abandoned call keeps its worst-case estimate: recorded spend never falls below real spend.
    assert abandoned["completion_tokens"] == 64
    # It was no accepted answer, so it adds nothing to the all-frontier counterfactual.
    assert abandoned["reference_cost_usd"] is None


def test_a_run_started_before_leases_had_tokens_resumes(
    project: Project, ollama: OllamaServer
) -> None:
    """Such a run is "running" with token 0: its first lease has token 1, like a
    queued run's, but what its dead process left must still be abandoned."""
    write_two_steps(project)
    runner, workflow, store = project.runner("two")
    run_id = runner.create(workflow, {})
    with store.engine.begin() as connection:
        connection.execute(runs.update().where(runs.c.id == run_id).values(status="running"))
    pending = make_call(1, outcome="pending", model="ollama/llama3.2:1b")
    store.open_call(
        run_id=run_id,
        workflow="two",
        content_hash=workflow.content_hash,
        agent="helper",
        step_id="first",
        call=pending,
    )
    store.engine.dispose()
    with Client(config=project.config) as client:
        assert client.execute(run_id) == "succeeded"
    assert project.ledger_states() == [
        ("first", 1, "abandoned"),
        ("first", 2, "settled"),
        ("second", 1, "settled"),
    ]


def test_a_live_lease_stops_a_second_executor(project: Project, ollama: OllamaServer) -> None:
    write_two_steps(project)
    runner, workflow, store = project.runner("two")
    run_id = runner.create(workflow, {})
    assert store.acquire_lease(run_id, owner="someone-else", ttl_s=60)
    assert asyncio.run(runner.execute(workflow, run_id)) is None
    assert ollama.requests == []
    store.engine.dispose()


def test_a_finished_run_is_never_executed_again(project: Project, ollama: OllamaServer) -> None:
    write_two_steps(project)
    result = project.run("two")
    assert result.status == "succeeded"
    asked = len(ollama.chat_requests())
    assert resume(project, result.run_id) is None
    assert len(ollama.chat_requests()) == asked


def test_every_call_is_pending_before_its_request(project: Project, ollama: OllamaServer) -> None:
    write_two_steps(project)
    seen: list[list[tuple[str, int, str]]] = []

    def record_ledger(body: dict) -> Reply:
        seen.append(project.ledger_states())
        return Reply(text="ok")

    ollama.responder = record_ledger
    result = project.run("two")
    assert result.status == "succeeded"
    assert seen[0][-1] == ("first", 1, "pending")
    assert seen[1][-1] == ("second", 1, "pending")
    assert project.ledger_states() == [("first", 1, "settled"), ("second", 1, "settled")]


def test_cancel_cuts_off_the_step_in_flight_and_starts_no_other(
    project: Project, ollama: OllamaServer
) -> None:
    write_two_steps(project)
    store = project.store()

    def answer(body: dict[str, Any]) -> Reply:
        store.cancel_run(store.runs()[0]["id"])  # while the first step is in flight
        return Reply(text="late", delay_s=60)

    ollama.responder = answer
    result = project.run("two")  # returns long before the model would answer
    store.engine.dispose()
    assert result.status == "cancelled"
    assert [r["messages"][-1]["content"] for r in ollama.chat_requests()] == ["first"]
    [run] = project.store().runs()
    assert run["status"] == "cancelled"
    assert project.ledger_states() == [("first", 1, "abandoned")]


def wide_project(root: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    """Workflow ``wide``: two parallel frontier steps and a three-item fan-out, budgeted."""
    project = frontier_project(root, ollama, frontier, {"daily_usd": "5"}, lease_ttl_s=1)
    frontier_step = {"agent": "brief", "tier": "frontier"}
    project.workflow(
        {
            "name": "wide",
            "budget": {"daily_usd": "5"},
            "inputs": {"words": {"type": "array", "default": ["x", "y", "z"]}},
            "steps": [
                {"id": "left", **frontier_step, "prompt": "left"},
                {"id": "right", **frontier_step, "prompt": "right"},
                {"id": "each", **frontier_step, "for_each": "inputs.words", "prompt": "{{ item }}"},
            ],
        }
    )
    return project


def test_cancel_stops_parallel_steps_and_fan_out_items_in_flight(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    frontier.responder = lambda body: Reply(text="late", delay_s=60)
    project = wide_project(tmp_path / "p", ollama, frontier)
    proc = start_run(project, "wide")
    try:
        wait_for(lambda: len(frontier.chat_requests()) == 5)  # every call is in flight
        [run] = project.store().runs()
        cancelled = tierflow("cancel", run["id"][:8], cwd=project.root)
        assert cancelled.returncode == 0, cancelled.stderr
        # The model would answer in 60 s; the run ends long before, its calls cut off.
        assert proc.wait(timeout=30) == 1
    finally:
        kill(proc)
    [run] = project.store().runs()
    assert run["status"] == "cancelled"
    assert sorted(project.ledger_states()) == sorted(
        [("left", 1, "abandoned"), ("right", 1, "abandoned")]
        + [("each", attempt, "abandoned") for attempt in (1, 2, 3)]
    )
    assert len(frontier.chat_requests()) == 5  # nothing was asked after the cancel
    # Cut off mid-call, each may have been billed: its worst case is spent, none reserved.
    assert_nothing_reserved(project)
    spent = sum(row["cost_usd"] for row in ledger(project))
    assert spent > 0 and all(counted == (spent, 0) for counted in counters(project).values())


@pytest.mark.parametrize("end", ["resumed", "failed", "changed", "missing", "cancelled"])
def test_no_reservation_outlives_any_end_of_a_run(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, end: str
) -> None:
    frontier.responder = lambda body: Reply(text="slow", delay_s=60)
    project = frontier_project(tmp_path / "p", ollama, frontier, {"daily_usd": "5"}, lease_ttl_s=1)
    run_id = killed_mid_call(project, "ask", "answer")
    assert any(reserved > 0 for _, reserved in counters(project).values())
    frontier.responder = lambda body: (
        Reply(status=500, text="down") if end == "failed" else Reply(text="fast")
    )
    time.sleep(1.2)  # the dead process's lease goes stale
    if end == "changed":
        project.agent("brief", prompt="Briefly: {{ inputs.text }}", max_tokens=10)
    if end == "missing":
        (project.root / "workflows" / "ask.yaml").unlink()
    if end == "cancelled":
        assert tierflow("cancel", run_id, cwd=project.root).returncode == 0
    elif end == "missing":
        assert execute_by_id(load_settings(project.config), run_id) == "failed"
    else:
        resumed = tierflow("resume", run_id, cwd=project.root)
        assert resumed.returncode == (0 if end == "resumed" else 1), resumed.stderr
    run = project.store().run(run_id)
    assert run is not None
    expected = {"resumed": "succeeded", "cancelled": "cancelled"}.get(end, "failed")
    assert run["status"] == expected
    if end == "changed":
        assert "its agents or the tiers it uses changed" in run["error"]
    assert_nothing_reserved(project)


def test_a_run_whose_process_died_shows_stale_and_resumes_from_the_cli(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(tmp_path, {"tiers": tiers_for(ollama, frontier), "lease_ttl_s": 1})
    write_two_steps(project)
    ollama.responder = lambda body: Reply(
        text="slow", delay_s=60 if body["messages"][-1]["content"] == "second" else 0
    )
    run_id = killed_mid_call(project, "two", "second")
    ollama.responder = lambda body: Reply(text="now")
    wait_for(lambda: "stale" in tierflow("runs", cwd=project.root).stdout)
    resumed = tierflow("resume", run_id[:10], cwd=project.root)
    assert resumed.returncode == 0, resumed.stderr
    assert "succeeded" in resumed.stdout
    assert project.ledger_states() == [
        ("first", 1, "settled"),
        ("second", 1, "abandoned"),
        ("second", 2, "settled"),
    ]
    again = tierflow("resume", run_id, cwd=project.root)
    assert again.returncode == 2 and "already succeeded" in again.stderr


def test_a_cancelled_queued_run_is_never_executed(project: Project, ollama: OllamaServer) -> None:
    write_two_steps(project)
    runner, workflow, store = project.runner("two")
    run_id = runner.create(workflow, {})
    assert store.cancel_run(run_id) == "cancelled"
    assert asyncio.run(runner.execute(workflow, run_id)) is None
    assert ollama.requests == []
    assert store.cancel_run(run_id) == "cancelled"  # cancelling twice is harmless
    store.engine.dispose()
