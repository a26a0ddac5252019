"""Confidential inputs taint every step that reads them, directly or through other steps."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from conftest import Project

from orchestrator.errors import SpecError
from orchestrator.scheduler import ladder
from orchestrator.settings import load_settings
from orchestrator.spec import LoadedWorkflow, find_workflow, load_workflow
from orchestrator.templates import Template
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

INPUTS = {
    "ticket": {"type": "string", "confidential": True},
    "language": {"type": "string", "default": "en"},
    "notes": {"type": "array", "items": {"type": "string"}, "default": []},
}


def step(id: str, tier: str = "light", **fields: Any) -> dict[str, Any]:
    return {"id": id, "agent": "helper", "tier": tier, "prompt": "hello", **fields}


def load(project: Project, *steps: dict[str, Any]) -> LoadedWorkflow:
    project.workflow({"name": "w", "inputs": INPUTS, "steps": list(steps)})
    settings = load_settings(project.config)
    return load_workflow(find_workflow("w", settings), settings)


def taints(workflow: LoadedWorkflow) -> dict[str, str | None]:
    return {plan.id: None if plan.taint is None else str(plan.taint) for plan in workflow.steps}


def test_a_step_that_reads_a_confidential_input_is_tainted(project: Project) -> None:
    workflow = load(
        project,
        step("label", prompt="Label: {{ inputs.ticket }}"),
        step("greet", prompt="Say hi in {{ inputs['language'] }}"),
    )
    found = taints(workflow)
    assert found["greet"] is None
    assert found["label"] is not None
    assert found["label"].startswith("reads confidential input 'ticket'")


def test_taint_flows_through_step_outputs_however_far(project: Project) -> None:
    workflow = load(
        project,
        step("label", prompt="{{ inputs.ticket }}"),
        step("plan", needs=["label"], prompt="Plan for {{ steps.label.output }}"),
        step("reply", needs=["plan"], prompt="Reply with {{ steps['plan'].output }}"),
        step("untouched", needs=["label"], prompt="needs is not reading"),
    )
    found = taints(workflow)
    assert found["untouched"] is None
    assert found["plan"] is not None and found["reply"] is not None
    assert "through steps.label.output" in found["plan"]
    assert "through steps.plan.output, via steps.label.output" in found["reply"]


@pytest.mark.parametrize(
    "fields",
    [
        {"when": "inputs.ticket != ''"},
        {"for_each": "[inputs.ticket]", "prompt": "{{ item }}"},
        {"checks": ["output != inputs.ticket"]},
        {"prompt": None},  # the agent's default prompt reads it
    ],
    ids=["when", "for_each", "checks", "agent-prompt"],
)
def test_every_text_of_a_step_counts(project: Project, fields: dict[str, Any]) -> None:
    project.agent("ticketer", prompt="{{ inputs.ticket }}")
    spec = {**step("a", agent="ticketer"), **fields}
    if spec["prompt"] is None:
        del spec["prompt"]
    [plan] = load(project, spec).steps
    assert plan.taint is not None and plan.local_only


def test_the_agents_system_prompt_counts(project: Project) -> None:
    project.agent("ticketer", system="Context: {{ inputs.ticket }}", prompt="hi")
    [plan] = load(project, step("a", agent="ticketer")).steps
    assert plan.taint is not None
    assert "agent's system prompt" in str(plan.taint)


@pytest.mark.parametrize(
    "prompt",
    [
        "{{ inputs }}",
        "{{ inputs | tojson }}",
        "{% for key in inputs %}{{ key }}{% endfor %}",
        "{% set name = 'tick' ~ 'et' %}{{ inputs[name] }}",
        "{% set everything = inputs %}{{ everything.ticket }}",
        "{{ inputs | attr('ticket') }}",
    ],
)
def test_reading_the_whole_inputs_object_counts_as_reading_every_input(
    project: Project, prompt: str
) -> None:
    [plan] = load(project, step("a", prompt=prompt)).steps
    assert plan.taint is not None, prompt
    assert "'ticket'" in str(plan.taint)


@pytest.mark.parametrize(
    "prompt",
    [
        "{{ steps }}",
        "{% set name = 'label' %}{{ steps[name].output }}",
    ],
)
def test_reading_the_whole_steps_object_counts_as_reading_every_step(
    project: Project, prompt: str
) -> None:
    workflow = load(
        project,
        step("label", prompt="{{ inputs.ticket }}"),
        step("other", prompt="{{ inputs.language }}"),
        step("all", needs=["label", "other"], prompt=prompt),
    )
    found = taints(workflow)
    assert found["other"] is None
    assert found["all"] is not None and "steps.label.output" in found["all"]


@pytest.mark.parametrize(
    "source",
    [
        "{% for key, value in inputs.items() %}{{ value }}{% endfor %}",
        "{{ inputs.values() | list }}",
        "{{ inputs.get('ticket') }}",
        "{% for id, s in steps.items() %}{{ s.output }}{% endfor %}",
        "{{ steps.values() | list }}",
    ],
)
def test_a_dict_method_reads_the_whole_object(source: str) -> None:
    # Loading refuses these today (no input is named "items"), but the analysis does
    # not lean on that: a method of the object hands out every key.
    name = "inputs" if "inputs" in source else "steps"
    assert (name, None) in Template(source).reads


def test_a_tainted_step_with_no_local_tier_is_refused_naming_line_step_and_path(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    path = project.workflow(
        {
            "name": "leaky",
            "inputs": INPUTS,
            "steps": [
                step("classify", prompt="{{ inputs.ticket }}"),
                step("reply", "frontier", needs=["classify"], prompt="{{ steps.classify.output }}"),
            ],
        }
    )
    settings = load_settings(project.config)
    with pytest.raises(SpecError) as caught:
        load_workflow(path, settings)
    [problem] = caught.value.problems
    line = next(
        number
        for number, text in enumerate(path.read_text().splitlines(), 1)
        if "tier: frontier" in text
    )
    assert problem.startswith(f"{path}:{line}: steps[1].tier: ")
    assert "step 'reply' reads confidential input 'ticket' through steps.classify.output" in (
        problem
    )
    assert "local: true" in problem
    assert ollama.requests == [] and frontier.requests == []


def test_tier_auto_and_agent_tiers_are_checked_too(tmp_path: Any) -> None:
    project = Project(
        tmp_path / "p",
        {"tiers": {"frontier": {"models": [{"model": "openai/gpt-4o-mini"}]}}},
    )
    project.agent("remote", prompt="{{ inputs.ticket }}", tier="frontier")
    path = project.workflow(
        {
            "name": "auto",
            "inputs": INPUTS,
            "steps": [
                {"id": "a", "agent": "helper", "tier": "auto", "prompt": "{{ inputs.ticket }}"},
                {"id": "b", "agent": "remote"},
            ],
        }
    )
    with pytest.raises(SpecError) as caught:
        load_workflow(path, load_settings(project.config))
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert re.search(r":\d+: steps\[0\]\.tier: step 'a' reads confidential input", problems[0])
    assert re.search(r":\d+: steps\[1\]\.agent: step 'b' reads confidential input", problems[1])


def test_the_ladder_of_a_tainted_step_holds_only_local_tiers(project: Project) -> None:
    workflow = load(
        project,
        step("label", prompt="{{ inputs.ticket }}"),
        step("auto", "auto", needs=["label"], prompt="{{ steps.label.output }}"),
        step("plain", prompt="{{ inputs.language }}"),
    )
    settings = load_settings(project.config)
    plans = {plan.id: plan for plan in workflow.steps}
    assert [name for name, _ in ladder(settings, plans["label"])] == ["light"]
    assert [name for name, _ in ladder(settings, plans["auto"])] == ["light"]
    assert [name for name, _ in ladder(settings, plans["plain"])] == ["light", "frontier"]


def test_a_tainted_step_fails_on_local_tiers_rather_than_escalate_to_the_frontier(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "w",
            "inputs": INPUTS,
            "steps": [
                step("plain", prompt="Say hi in {{ inputs.language }}", output={"type": "object"}),
                step(
                    "label",
                    "auto",
                    needs=["plain"],  # after the frontier answered the other step
                    prompt="Label {{ inputs.ticket }}",
                    output={"type": "object"},
                ),
            ],
        }
    )
    ollama.responder = lambda body: Reply(text="not json")
    frontier.responder = lambda body: Reply(text=json.dumps({"ok": True}))
    result = project.run("w", {"ticket": "CANARY-31337"})
    assert result.status == "failed"
    assert "CANARY-31337" not in json.dumps(frontier.requests)
    # The untainted step escalated: the frontier was there to be asked.
    assert [r["messages"][-1]["content"] for r in frontier.chat_requests()] == ["Say hi in en"]
    label = [c for c in project.calls(result.run_id) if c["step_id"] == "label"]
    assert label and {c["tier_used"] for c in label} == {"light"}
