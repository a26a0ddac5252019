"""uses: a step runs another workflow; its steps run in the parent run, named
STEP.CHILD_STEP, so their calls count under the parent: budgets, spend, show."""

from __future__ import annotations

import json
from typing import Any

from conftest import Project, tierflow

from orchestrator import reports
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def echo(body: dict[str, Any]) -> Reply:
    return Reply(text=f"<{body['messages'][-1]['content']}>")


def child(project: Project, tier: str = "light", **extra: Any) -> None:
    project.workflow(
        {
            "name": "headline",
            "inputs": {
                "facts": {"type": "string"},
                "words": {"type": "integer", "default": 8},
                **extra.pop("inputs", {}),
            },
            "steps": [
                {
                    "id": "write",
                    "agent": "helper",
                    "tier": tier,
                    "prompt": "headline of {{ inputs.words }} words: {{ inputs.facts }}",
                },
                *extra.pop("steps", []),
            ],
        }
    )


def parent(project: Project, **with_: Any) -> None:
    project.workflow(
        {
            "name": "story",
            "inputs": {"topic": {"type": "string", "default": "kelp"}},
            "steps": [
                {
                    "id": "facts",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "facts {{ inputs.topic }}",
                },
                {
                    "id": "title",
                    "uses": "headline",
                    "needs": ["facts"],
                    "with": with_ or {"facts": "{{ steps.facts.output }}", "words": "{{ 3 + 3 }}"},
                },
                {
                    "id": "final",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["title"],
                    "prompt": "final {{ steps.title.output.write }}",
                },
            ],
        }
    )


def test_a_sub_workflow_runs_inside_the_parent_run(project: Project, ollama: OllamaServer) -> None:
    child(project)
    parent(project)
    ollama.responder = echo
    result = project.run("story")
    assert result.status == "succeeded", result.error
    # A lone {{ expression }} keeps its type: words is the integer 6.
    assert result.outputs["title"] == {"write": "<headline of 6 words: <facts kelp>>"}
    assert result.outputs["final"] == "<final <headline of 6 words: <facts kelp>>>"
    steps = {s["step_id"]: s for s in project.steps(result.run_id)}
    assert set(steps) == {"facts", "title.write", "title", "final"}
    assert steps["title"]["output"] == result.outputs["title"]
    assert [c["step_id"] for c in project.calls(result.run_id)] == ["facts", "title.write", "final"]

    store = project.store()
    try:
        by_step = reports.report(store.engine, by="step")
    finally:
        store.engine.dispose()
    assert [row.key for row in by_step.groups] == [
        ("story", "facts"),
        ("story", "final"),
        ("story", "title.write"),
    ]


def test_a_sub_workflows_calls_count_against_the_parents_budget(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    child(project, tier="frontier")
    parent(project)
    story = project.root / "workflows" / "story.yaml"
    text = story.read_text()
    story.write_text(
        text.replace("name: story\n", "name: story\nbudget: {per_run_usd: 0.000001}\n")
    )
    ollama.responder = echo
    frontier.reply(Reply(text="costly", prompt_tokens=100_000, completion_tokens=10_000))
    result = project.run("story")
    assert result.status == "failed"
    assert "budget_blocked" in (result.error or "") and "per-run budget" in (result.error or "")
    assert frontier.requests == []
    blocked = [c for c in project.calls(result.run_id) if c["step_id"] == "title.write"]
    assert [c["outcome"] for c in blocked] == ["budget_blocked"]


def test_an_approval_inside_a_sub_workflow_pauses_the_parent(
    project: Project, ollama: OllamaServer
) -> None:
    child(project, steps=[{"id": "check", "needs": ["write"], "approval": {"message": "ok?"}}])
    parent(project)
    ollama.responder = echo
    ran = tierflow("run", "story", cwd=project.root)
    assert ran.returncode == 0, ran.stderr
    assert "title.check  waits for approval: ok?" in ran.stdout
    run_id = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)[0]["id"]
    approved = tierflow("approve", run_id, "title.check", "--by", "mia", cwd=project.root)
    assert approved.returncode == 0, approved.stderr
    found = json.loads(tierflow("show", run_id, "--json", cwd=project.root).stdout)
    assert found["status"] == "succeeded"
    assert found["outputs"]["title"]["check"]["approved"] is True
    writes = [
        b
        for b in ollama.requests
        if b.get("messages") and b["messages"][-1]["content"].startswith("headline")
    ]
    assert len(writes) == 1  # the child's finished step was not run again


def test_confidential_inputs_stay_confidential_inside_the_sub_workflow(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    child(project)
    project.workflow(
        {
            "name": "story",
            "inputs": {"ticket": {"type": "string", "confidential": True}},
            "steps": [
                {"id": "title", "uses": "headline", "with": {"facts": "{{ inputs.ticket }}"}}
            ],
        }
    )
    ollama.responder = lambda body: Reply(status=500, text="local model crashed")
    frontier.reply("leaked")
    result = project.run("story", {"ticket": "CANARY-ticket"})
    assert result.status == "failed"
    assert frontier.requests == []  # the child's step stayed on the local tier


def test_bad_uses_are_refused_at_load_with_file_and_line(project: Project) -> None:
    child(project)
    cases = [
        (
            {"uses": "headlin", "with": {"facts": "x"}},
            "unknown workflow 'headlin' (did you mean 'headline'?)",
        ),
        (
            {"uses": "headline", "with": {"fact": "x"}},
            "has no input 'fact' (did you mean 'facts'?)",
        ),
        ({"uses": "headline"}, "workflow 'headline' needs input facts"),
        ({"uses": "headline", "agent": "helper", "with": {"facts": "x"}}, "takes no agent"),
    ]
    for step, said in cases:
        path = project.workflow({"name": "story", "steps": [{"id": "title", **step}]})
        proc = tierflow("validate", str(path), cwd=project.root)
        assert proc.returncode == 2, step
        assert said in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert "story.yaml:" in proc.stdout + proc.stderr


def test_a_cycle_across_files_is_refused(project: Project) -> None:
    project.workflow({"name": "ping", "steps": [{"id": "a", "uses": "pong"}]})
    project.workflow({"name": "pong", "steps": [{"id": "b", "uses": "ping"}]})
    proc = tierflow("validate", str(project.root / "workflows" / "ping.yaml"), cwd=project.root)
    assert proc.returncode == 2
    assert "workflows form a cycle: ping → pong → ping" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_retry_reuses_the_finished_steps_of_a_sub_workflow(
    project: Project, ollama: OllamaServer
) -> None:
    child(project, steps=[{"id": "check", "needs": ["write"], "approval": {"message": "ok?"}}])
    parent(project)
    ollama.responder = echo
    assert tierflow("run", "story", cwd=project.root).returncode == 0
    first = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)[0]["id"]
    rejected = tierflow("approve", first, "title.check", "--reject", cwd=project.root)
    assert rejected.returncode == 0, rejected.stderr

    def written() -> int:
        return sum(
            1
            for b in ollama.requests
            if b.get("messages") and b["messages"][-1]["content"].startswith("headline")
        )

    assert written() == 1
    retried = tierflow("retry", first, cwd=project.root)
    assert retried.returncode == 0, retried.stderr
    assert "title.check  waits for approval" in retried.stdout
    assert written() == 1  # title.write was taken from the first run
    again = tierflow("retry", first, "--from", "title", cwd=project.root)
    assert again.returncode == 0, again.stderr
    assert written() == 2  # --from title runs its sub-workflow again


def test_a_change_to_the_sub_workflow_changes_the_parents_identity(project: Project) -> None:
    from orchestrator.settings import load_settings
    from orchestrator.spec import load_workflow

    child(project)
    parent(project)
    settings = load_settings(project.config)
    before = load_workflow(project.root / "workflows" / "story.yaml", settings).content_hash
    headline = project.root / "workflows" / "headline.yaml"
    headline.write_text(headline.read_text().replace("headline of", "title of"))
    after = load_workflow(project.root / "workflows" / "story.yaml", settings).content_hash
    assert before != after  # a run resumed across the edit fails instead of mixing versions


def test_a_step_name_too_long_for_the_ledger_is_refused(project: Project) -> None:
    project.workflow(
        {"name": "headline", "steps": [{"id": "w" * 50, "agent": "helper", "tier": "light"}]}
    )
    long_id = "t" * 60
    path = project.workflow({"name": "story", "steps": [{"id": long_id, "uses": "headline"}]})
    proc = tierflow("validate", str(path), cwd=project.root)
    assert proc.returncode == 2
    assert "over 100 characters" in proc.stdout + proc.stderr
