"""tierflow retry: a new run, linked to an ended one, that reuses every step
that finished there and runs the rest."""

from __future__ import annotations

import json
from typing import Any

from conftest import Project, make_call, make_step, tierflow
from fastapi.testclient import TestClient

from orchestrator import Client
from orchestrator.api import create_app
from orchestrator.settings import load_settings
from orchestrator.store import Store
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

TOKEN = "retry-token"


def chain(project: Project) -> None:
    """draft → polish → title: each step's prompt names it, and reads the one before."""
    project.workflow(
        {
            "name": "chain",
            "steps": [
                {
                    "id": "draft",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "draft {{ inputs.text }}",
                },
                {
                    "id": "polish",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["draft"],
                    "prompt": "polish {{ steps.draft.output }}",
                    "checks": ["'ok' in output"],
                },
                {
                    "id": "title",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["polish"],
                    "prompt": "title {{ steps.polish.output }}",
                },
            ],
        }
    )


def asked(server: OllamaServer | OpenAIServer, word: str) -> int:
    """Chat requests whose prompt starts with ``word``."""
    return sum(
        1
        for body in server.requests
        if body.get("messages") and body["messages"][-1]["content"].startswith(word)
    )


def by_step(polished: str) -> Any:
    def answer(body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("polish"):
            return Reply(text=polished)
        return Reply(text=f"<{prompt}>")

    return answer


def failed_run(project: Project, ollama: OllamaServer, frontier: OpenAIServer) -> str:
    chain(project)
    ollama.responder = by_step("not good")
    frontier.responder = by_step("still not good")
    first = project.run("chain", {"text": "t"})
    assert first.status == "failed"
    assert [s["status"] for s in project.steps(first.run_id)] == ["succeeded", "failed"]
    return first.run_id


def test_a_retry_reuses_finished_steps_and_runs_the_rest(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    first = failed_run(project, ollama, frontier)
    ollama.responder = by_step("ok now")
    proc = tierflow("retry", first[:8], "--json", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded"
    assert result["outputs"] == {
        "draft": "<draft t>",
        "polish": "ok now",
        "title": "<title ok now>",
    }
    assert asked(ollama, "draft") == 1  # the draft was taken from the first run
    steps = {s["step_id"]: s for s in project.steps(result["run_id"])}
    assert steps["draft"]["reused_from"] == first
    assert steps["polish"]["reused_from"] is None and steps["title"]["reused_from"] is None
    assert {c["step_id"] for c in project.calls(result["run_id"])} == {"polish", "title"}
    shown = tierflow("show", result["run_id"], cwd=project.root).stdout
    assert f"(a retry of run {first})" in shown
    assert f"reused from run {first}" in shown
    # The first run is left as it was.
    assert [s["status"] for s in project.steps(first)] == ["succeeded", "failed"]


def test_retry_from_a_step_runs_it_and_its_dependents_again(
    project: Project, ollama: OllamaServer
) -> None:
    chain(project)
    ollama.responder = by_step("ok one")
    first = project.run("chain", {"text": "t"})
    assert first.status == "succeeded"
    ollama.responder = by_step("ok two")
    proc = tierflow("retry", first.run_id, "--from", "polish", "--json", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outputs"]["polish"] == "ok two"
    assert result["outputs"]["title"] == "<title ok two>"
    assert (asked(ollama, "draft"), asked(ollama, "polish"), asked(ollama, "title")) == (1, 2, 2)


def test_a_queued_retry_is_executed_by_a_worker_with_its_reused_steps(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    """The first lease of a queued run usually skips reading what ran before:
    a retry's must read the steps it reuses."""
    first = failed_run(project, ollama, frontier)
    ollama.responder = by_step("ok queued")
    app = create_app(load_settings(project.config), token=TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        answer = api.post(f"/runs/{first}/retry", json={})
        assert answer.status_code == 201, answer.text
        assert answer.json()["retry_of"] == first
        new_id = answer.json()["run_id"]
        assert api.post("/runs/0000000000/retry").status_code == 404
        missing = api.post(f"/runs/{first}/retry", json={"from": "polsh"})
        assert missing.status_code == 400 and "did you mean" in missing.json()["detail"]
    with Client(config=str(project.config)) as client:
        assert client.execute(new_id) == "succeeded"
        found = client.get_run(new_id)
    assert found is not None
    assert found["outputs"]["draft"] == "<draft t>" and found["outputs"]["polish"] == "ok queued"
    assert asked(ollama, "draft") == 1


def test_retry_refuses_bad_input_with_one_message(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    first = failed_run(project, ollama, frontier)
    cases = {
        ("retry", "ffffffff"): "no run 'ffffffff'",
        ("retry", first, "--from", "polsh"): "did you mean 'polish'",
    }
    for args, said in cases.items():
        proc = tierflow(*args, cwd=project.root)
        assert proc.returncode == 2, proc.stderr
        assert said in proc.stderr and "Traceback" not in proc.stderr

    runner, workflow, store = project.runner("chain")
    queued = runner.create(workflow, {"text": "t"})
    store.engine.dispose()
    proc = tierflow("retry", queued, cwd=project.root)
    assert proc.returncode == 2
    assert "is queued: retry a run once it has ended" in proc.stderr


def test_a_retry_copies_only_finished_steps_on_each_database(store: Store) -> None:
    store.create_run(run_id="a" * 32, workflow="w", version=None, content_hash="h", inputs={})
    for step_id, status in (("one", "succeeded"), ("two", "skipped"), ("three", "failed")):
        record = make_step(step_id, [make_call(1)], status=status, output={"of": step_id})
        store.record_step(run_id="a" * 32, workflow="w", content_hash="h", record=record)
    store.create_run(
        run_id="b" * 32,
        workflow="w",
        version=None,
        content_hash="h",
        inputs={},
        retry_of="a" * 32,
        reuse=["one", "two", "three"],
    )
    copied = store.run("b" * 32)
    assert copied is not None and copied["retry_of"] == "a" * 32
    assert [
        (s["step_id"], s["status"], s["output"], s["reused_from"]) for s in copied["steps"]
    ] == [
        ("one", "succeeded", {"of": "one"}, "a" * 32),
        ("two", "skipped", {"of": "two"}, "a" * 32),
    ]
    assert copied["calls"] == []
    assert store.finished_steps("a" * 32) == ["one", "two"]
