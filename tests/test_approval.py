"""Approval steps: the run waits for a person with no lease and no worker, then
carries on (approved) or fails (rejected), from the CLI, the API or a worker."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for, wait_for
from fastapi.testclient import TestClient
from test_queue import BROKERS, Worker, reachable, start_worker, workers  # noqa: F401

from orchestrator import Client
from orchestrator.api import create_app
from orchestrator.settings import load_settings
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

TOKEN = "approval-token"


def gated(project: Project, **approval: Any) -> None:
    """draft → gate (a person) → send, which reads the decision's note."""
    project.workflow(
        {
            "name": "gated",
            "inputs": {"customer": {"type": "string", "default": "Ana"}},
            "steps": [
                {
                    "id": "draft",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "draft for {{ inputs.customer }}",
                },
                {
                    "id": "gate",
                    "needs": ["draft"],
                    "approval": {
                        "message": "Send '{{ steps.draft.output }}' to {{ inputs.customer }}?",
                        **approval,
                    },
                },
                {
                    "id": "send",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["gate"],
                    "when": "steps.gate.output.approved",
                    "prompt": "send {{ steps.draft.output }} (note: {{ steps.gate.output.note }})",
                },
            ],
        }
    )


def echo(body: dict[str, Any]) -> Reply:
    return Reply(text=f"<{body['messages'][-1]['content']}>")


def run_row(project: Project, run_id: str) -> dict[str, Any]:
    with Client(config=str(project.config)) as client:
        found = client.store.run_row(run_id)
    assert found is not None
    return found


def waiting_run(project: Project, ollama: OllamaServer, **approval: Any) -> str:
    gated(project, **approval)
    ollama.responder = echo
    ran = tierflow("run", "gated", cwd=project.root)
    assert ran.returncode == 0, ran.stderr
    assert "gate  waits for approval: Send '<draft for Ana>' to Ana?" in ran.stdout
    run_id = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)[0]["id"]
    assert f"tierflow approve {run_id[:12]} gate" in ran.stdout
    return run_id


def test_a_run_waits_holding_no_lease_then_carries_on_when_approved(
    project: Project, ollama: OllamaServer
) -> None:
    run_id = waiting_run(project, ollama)
    row = run_row(project, run_id)
    assert (row["status"], row["lease_owner"], row["lease_expires_s"]) == ("waiting", None, None)
    steps = {s["step_id"]: s for s in project.steps(run_id)}
    assert steps["gate"]["status"] == "waiting"
    assert steps["gate"]["output"] == {"message": "Send '<draft for Ana>' to Ana?"}
    listed = json.loads(tierflow("runs", "--status", "waiting", "--json", cwd=project.root).stdout)
    assert [r["id"] for r in listed] == [run_id]

    approved = tierflow(
        "approve", run_id[:8], "gate", "--note", "ship it", "--by", "mia", cwd=project.root
    )
    assert approved.returncode == 0, approved.stderr
    assert "✓ gate  approved by mia: ship it" in approved.stdout
    assert "✓ send" in approved.stdout
    found = json.loads(tierflow("show", run_id, "--json", cwd=project.root).stdout)
    assert found["status"] == "succeeded"
    assert found["outputs"]["send"] == "<send <draft for Ana> (note: ship it)>"
    gate = next(s for s in found["steps"] if s["step_id"] == "gate")
    assert gate["output"]["approved"] is True and gate["output"]["by"] == "mia"
    # The draft ran once: the run carried on from where it waited.
    drafts = [
        b
        for b in ollama.requests
        if b.get("messages") and b["messages"][-1]["content"].startswith("draft for")
    ]
    assert len(drafts) == 1

    again = tierflow("approve", run_id, "gate", cwd=project.root)
    assert again.returncode == 2
    assert "was approved already, by mia" in again.stderr


def test_a_rejection_fails_the_run_with_the_note(project: Project, ollama: OllamaServer) -> None:
    run_id = waiting_run(project, ollama)
    rejected = tierflow(
        "approve", run_id, "gate", "--reject", "--note", "too curt", "--by", "mia", cwd=project.root
    )
    assert rejected.returncode == 0, rejected.stderr
    assert f"rejected: run {run_id} failed" in rejected.stdout
    row = run_row(project, run_id)
    assert row["status"] == "failed"
    assert row["error"] == "step gate was rejected by mia: too curt"
    assert not any(
        "send " in b["messages"][-1]["content"] for b in ollama.requests if b.get("messages")
    )


def test_bad_decisions_are_one_clear_message(project: Project, ollama: OllamaServer) -> None:
    run_id = waiting_run(project, ollama)
    cases = {
        ("approve", run_id, "draft"): "step 'draft' of run",
        ("approve", "ffffffff", "gate"): "no run 'ffffffff'",
    }
    for args, said in cases.items():
        proc = tierflow(*args, cwd=project.root)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert "gate is" in tierflow("approve", run_id, "draft", cwd=project.root).stderr
    assert tierflow("cancel", run_id, cwd=project.root).returncode == 0
    proc = tierflow("approve", run_id, "gate", cwd=project.root)
    assert proc.returncode == 2
    assert "is cancelled, not waiting for an approval" in proc.stderr


def test_a_run_waiting_past_its_timeout_fails(project: Project, ollama: OllamaServer) -> None:
    run_id = waiting_run(project, ollama, timeout_s=1)
    assert run_row(project, run_id)["waiting_until"] is not None
    time.sleep(1.2)
    proc = tierflow("approve", run_id, "gate", cwd=project.root)
    assert proc.returncode == 2
    assert "waited past its step's timeout_s and has failed" in proc.stderr
    row = run_row(project, run_id)
    assert row["status"] == "failed" and "within its timeout_s" in row["error"]


def test_the_sweepers_expiry_fails_only_late_runs(project: Project, ollama: OllamaServer) -> None:
    late = waiting_run(project, ollama, timeout_s=1)
    patient = waiting_run(project, ollama)
    time.sleep(1.2)
    with Client(config=str(project.config)) as client:
        assert client.store.expire_waiting() == [late]
    assert run_row(project, late)["status"] == "failed"
    assert run_row(project, patient)["status"] == "waiting"


def test_an_approval_step_with_an_agent_is_refused_at_load(project: Project) -> None:
    path = project.workflow(
        {
            "name": "bad",
            "steps": [{"id": "gate", "agent": "helper", "approval": {"message": "ok?"}}],
        }
    )
    proc = tierflow("validate", str(path), cwd=project.root)
    assert proc.returncode == 2
    assert "bad.yaml:" in proc.stderr + proc.stdout
    assert "an approval step calls no model, so it takes no agent" in proc.stderr + proc.stdout
    path = project.workflow({"name": "bad", "steps": [{"id": "lonely"}]})
    proc = tierflow("validate", str(path), cwd=project.root)
    assert proc.returncode == 2 and "give the step an agent:" in proc.stderr + proc.stdout


@pytest.fixture
def on_redis(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    if not reachable(str(BROKERS["redis"])):
        from conftest import missing_service

        missing_service("redis is not running on 127.0.0.1")
    return Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier, timeout_s=60),
            "lease_ttl_s": 1.5,
            "broker": BROKERS["redis"],
            "queue": f"tierflow-test-{uuid.uuid4().hex[:10]}",
        },
    )


def test_a_queued_run_waits_and_a_worker_carries_it_on_after_the_apis_approval(
    on_redis: Project,
    ollama: OllamaServer,
    workers: list[Worker],  # noqa: F811
) -> None:
    gated(on_redis)
    ollama.responder = echo
    start_worker(on_redis, workers)
    with Client(config=str(on_redis.config)) as client:
        run_id = client.enqueue("gated", {"customer": "Bo"})
        wait_for(lambda: run_row(on_redis, run_id)["status"] == "waiting", timeout=60)
    assert run_row(on_redis, run_id)["lease_owner"] is None

    app = create_app(load_settings(on_redis.config), token=TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        wrong = api.post(f"/runs/{run_id}/steps/draft/approval", json={"approved": True})
        assert wrong.status_code == 400 and "not waiting" in wrong.json()["detail"]
        answer = api.post(
            f"/runs/{run_id}/steps/gate/approval",
            json={"approved": True, "note": "fine", "by": "ops"},
        )
        assert answer.status_code == 201, answer.text
        assert answer.json()["status"] == "queued"
        wait_for(lambda: run_row(on_redis, run_id)["status"] == "succeeded", timeout=60)
        twice = api.post(f"/runs/{run_id}/steps/gate/approval", json={"approved": True})
        assert twice.status_code == 400 and "approved already, by ops" in twice.json()["detail"]
    found = Client(config=str(on_redis.config)).get_run(run_id)
    assert found is not None
    assert found["outputs"]["send"] == "<send <draft for Bo> (note: fine)>"


def test_the_dashboard_lists_what_waits(project: Project, ollama: OllamaServer) -> None:
    run_id = waiting_run(project, ollama, timeout_s=3600)
    app = create_app(load_settings(project.config), token=TOKEN)
    with TestClient(app) as client:
        page = client.get(f"/?token={TOKEN}").text
    assert f'<tr data-run="{run_id}">' in page
    assert "Send &#39;&lt;draft for Ana&gt;&#39; to Ana?" in page
    assert f"tierflow approve {run_id[:12]} gate" in page
