"""The public surface of ``orchestrator``: what users may import, pinned here."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Project, write_two_steps

import orchestrator
from orchestrator.testing import OllamaServer

PUBLIC = {
    "Client",
    "LeaseLost",
    "ModelError",
    "RunCancelled",
    "RunError",
    "RunResult",
    "SpecError",
    "StepFailed",
    "TierflowError",
    "UserError",
    "arun",
    "enqueue",
    "get_run",
    "run",
}


def test_the_public_names_are_exactly_these() -> None:
    assert set(orchestrator.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(orchestrator, name) is not None
    assert orchestrator.RunResult.__module__ == "orchestrator.runner"


def test_importing_the_package_loads_no_engine() -> None:
    code = "import sys, orchestrator; print(sorted(m for m in ('litellm', 'langgraph', 'sqlalchemy', 'jinja2', 'orchestrator.runner') if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_a_client_runs_again_and_again_without_reading_its_files_again(
    project: Project, ollama: OllamaServer
) -> None:
    write_two_steps(project)
    with orchestrator.Client(config=str(project.config)) as client:
        first = client.run("two")
        (project.root / "tierflow.yaml").write_text("not: [valid")  # never read again
        second = client.run("two")
        assert (first.status, second.status) == ("succeeded", "succeeded")
        assert client.get_run(second.run_id[:8])["status"] == "succeeded"  # type: ignore[index]
        assert client.wait(first.run_id, timeout=1)["outputs"] == first.outputs


def test_run_inside_an_event_loop_says_to_use_arun(project: Project) -> None:
    write_two_steps(project)

    async def inside() -> None:
        with orchestrator.Client(config=str(project.config)) as client:
            client.run("two")

    with pytest.raises(orchestrator.UserError, match="use 'await client"):
        asyncio.run(inside())


def test_a_client_cancels_and_waits(project: Project, tmp_path: Path) -> None:
    write_two_steps(project)
    with orchestrator.Client(config=str(project.config)) as client:
        runner, workflow, store = project.runner("two")
        run_id = runner.create(workflow, {})
        store.engine.dispose()
        with pytest.raises(TimeoutError, match="still queued"):
            client.wait(run_id, timeout=0.05)
        assert client.cancel(run_id[:8]) == "cancelled"
        assert client.wait(run_id)["status"] == "cancelled"
        with pytest.raises(orchestrator.UserError, match="no run"):
            client.cancel("nope-not-a-run")


def test_a_client_executes_a_recorded_run_once(project: Project, ollama: OllamaServer) -> None:
    """What a queue worker does with a message, through the worker's own client."""
    write_two_steps(project)
    ollama.reply("one", "two")
    with orchestrator.Client(config=str(project.config), tiers=["light"]) as client:
        run_id = client._plain_runner().create(client.load("two"), {})
        assert client.execute(run_id) == "succeeded"
        assert client.execute(run_id) == "succeeded"  # a duplicate message: nothing runs again
        assert client.execute("0" * 32) == "unknown"
        assert client.get_run(run_id)["outputs"] == {"first": "one", "second": "two"}
    assert len(ollama.chat_requests()) == 2
