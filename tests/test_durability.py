"""Crash safety: pending ledger rows, leases, and resuming a run whose process was killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Project, tiers_for, wait_for, write_two_steps

from orchestrator.runner import RunResult
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "two"],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: ("second", 1, "pending") in project.ledger_states())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
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
    assert abandoned["completion_tokens"] == 64 and abandoned["reference_cost_usd"] > 0


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


def test_cancel_stops_a_running_run_before_its_next_step(
    project: Project, ollama: OllamaServer
) -> None:
    write_two_steps(project)
    store = project.store()

    def answer(body: dict) -> Reply:
        [run] = store.runs()
        store.cancel_run(run["id"])  # while the first step is in flight
        return Reply(text="one")

    ollama.responder = answer
    result = project.run("two")
    store.engine.dispose()
    assert result.status == "cancelled"
    assert [r["messages"][-1]["content"] for r in ollama.chat_requests()] == ["first"]
    [run] = project.store().runs()
    assert run["status"] == "cancelled"
    assert project.ledger_states() == [("first", 1, "settled")]  # what it spent stays recorded


def test_a_cancelled_queued_run_is_never_executed(project: Project, ollama: OllamaServer) -> None:
    write_two_steps(project)
    runner, workflow, store = project.runner("two")
    run_id = runner.create(workflow, {})
    assert store.cancel_run(run_id) == "cancelled"
    assert asyncio.run(runner.execute(workflow, run_id)) is None
    assert ollama.requests == []
    assert store.cancel_run(run_id) == "cancelled"  # cancelling twice is harmless
    store.engine.dispose()
