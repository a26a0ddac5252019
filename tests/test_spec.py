"""Validation: every bad file gives exit 2 and FILE:LINE: field: message, before any model call."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Project

from orchestrator.errors import SpecError, UserError
from orchestrator.settings import load_settings
from orchestrator.spec import load_workflow
from orchestrator.testing import OllamaServer, OpenAIServer
from orchestrator.validation import json_schemas, validate_paths

BAD = REPO / "tests" / "bad"
BAD_FILES = sorted((BAD / "files").glob("*.yaml"))


def expectation(path: Path) -> tuple[int, str]:
    match = re.match(r"# expect: (\d+): (.*)", path.read_text().splitlines()[0])
    assert match, f"{path} needs a first line '# expect: LINE: text'"
    return int(match.group(1)), match.group(2)


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_file_names_file_line_and_field(path: Path) -> None:
    line, text = expectation(path)
    problems, _ = validate_paths([path], config=str(BAD / "tierflow.yaml"))
    assert problems, f"{path.name} was accepted"
    assert any(p.startswith(f"{path}:{line}: ") and text in p for p in problems), problems


def test_validate_command_exits_2_with_one_line_per_problem_and_no_traceback() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "validate",
            str(BAD / "files"),
            "--config",
            str(BAD / "tierflow.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    for path in BAD_FILES:
        assert f"{path.relative_to(REPO)}:{expectation(path)[0]}: " in proc.stderr


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("name: big\ndescription: " + "x" * (1024 * 1024) + "\nsteps: []\n")
    [problem], _ = validate_paths([big], config=str(BAD / "tierflow.yaml"))
    assert problem.startswith(f"{big}:1: ") and "1 MiB" in problem


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\nsteps: []\n")
    [problem], _ = validate_paths([evil], config=str(BAD / "tierflow.yaml"))
    assert problem.startswith(f"{evil}:1: ") and "invalid YAML" in problem


def test_escalation_on_key_is_not_read_as_a_boolean(tmp_path: Path) -> None:
    config = tmp_path / "tierflow.yaml"
    config.write_text(
        "tiers: {light: {models: [llamacpp/smollm2-135m], local: true}}\nescalation: {on: [error], max_attempts: 2}\n"
    )
    settings = load_settings(config)
    assert settings.config.escalation.on == ["error"]


def test_shipped_workflows_agents_and_config_validate() -> None:
    shipped = [REPO / "workflows", REPO / "agents", REPO / "tierflow.yaml"]
    files = [*shipped[0].glob("*.yaml"), *shipped[1].glob("*.yaml"), shipped[2]]
    assert validate_paths(shipped, config=str(REPO / "tierflow.yaml")) == ([], len(files))
    assert len(list((REPO / "workflows").glob("*.yaml"))) >= 3


def test_compile_time_rejection_happens_before_any_model_call(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "broken",
            "steps": [
                {"id": "a", "agent": "helper", "tier": "light", "needs": ["c"]},
                {"id": "b", "agent": "helper", "tier": "light", "needs": ["a"]},
                {"id": "c", "agent": "helper", "tier": "light", "needs": ["b"]},
            ],
        }
    )
    with pytest.raises(SpecError, match="cycle: a, b, c"):
        project.run("broken")
    assert ollama.requests == [] and frontier.requests == []


def test_inputs_are_checked_before_a_run_is_recorded(
    project: Project, ollama: OllamaServer
) -> None:
    project.workflow(
        {
            "name": "typed",
            "inputs": {"count": {"type": "integer"}},
            "steps": [{"id": "a", "agent": "helper", "prompt": "{{ inputs.count }}"}],
        }
    )
    with pytest.raises(UserError, match="input 'count': required"):
        project.run("typed")
    with pytest.raises(UserError, match="'three' is not of type 'integer'"):
        project.run("typed", {"count": "three"})
    with pytest.raises(
        UserError,
        match=r"input 'cuont': not declared \(did you mean 'count'\?\); inputs are count$",
    ):
        project.run("typed", {"count": 1, "cuont": 2})
    store = project.store()
    assert store.runs() == []
    store.engine.dispose()
    assert ollama.requests == []


def test_output_fields_are_checked_only_where_the_schema_closes_them(tmp_path: Path) -> None:
    """A field missing from an object schema's properties is a problem; an open
    schema (additionalProperties), a for_each step or a dict method is not."""
    project = Project(tmp_path / "p", {"tiers": {"light": {"models": ["ollama/m"], "local": True}}})

    def schema(**more: Any) -> dict[str, Any]:  # new dicts each: the YAML has no aliases
        return {"type": "object", "properties": {"label": {"type": "string"}}, **more}

    steps: list[dict[str, Any]] = [
        {"id": "closed", "agent": "helper", "output": schema()},
        {"id": "opened", "agent": "helper", "output": schema(additionalProperties=True)},
        {"id": "each", "agent": "helper", "output": schema(), "for_each": "[1, 2]"},
        {
            "id": "reader",
            "agent": "helper",
            "needs": ["closed", "opened", "each"],
            "prompt": "{{ steps.closed.output.label }} {{ steps.opened.output.extra }}"
            " {{ steps.each.output }} {{ steps.closed.output.items() | list }}"
            " {{ steps.closed.output.note | default('') }} {{ steps.closed.output.n | d(0) }}",
            "when": "steps.closed.output.extra is defined",
        },
    ]
    settings = load_settings(project.config)
    load_workflow(project.workflow({"name": "fine", "steps": steps}), settings)
    steps.insert(0, {"id": "iffy", "agent": "helper", "output": schema(then={"required": []})})
    steps[-1]["needs"].append("iffy")
    steps[-1]["prompt"] += " {{ steps.iffy.output.other }}"
    load_workflow(project.workflow({"name": "fine", "steps": steps}), settings)
    steps[-1]["when"] = "steps.closed.output.lable"
    with pytest.raises(SpecError, match=r"steps\.closed\.output has no field 'lable'") as raised:
        load_workflow(project.workflow({"name": "typo", "steps": steps}), settings)
    assert len(raised.value.problems) == 1


def test_a_step_is_read_through_its_output(tmp_path: Path) -> None:
    """``steps.a`` holds only ``output``: reading it whole, or another key, is refused."""
    project = Project(tmp_path / "p", {"tiers": {"light": {"models": ["ollama/m"], "local": True}}})
    settings = load_settings(project.config)

    def workflow(prompt: str) -> Path:
        steps = [
            {"id": "a", "agent": "helper"},
            {"id": "b", "agent": "helper", "needs": ["a"], "prompt": prompt},
        ]
        return project.workflow({"name": "w", "steps": steps})

    load_workflow(workflow("{{ steps.a.output }} {{ steps['a']['output'] | upper }}"), settings)
    for prompt, read in (
        ("{{ steps.a }}", "steps.a"),
        ("{{ steps.a | tojson }}", "steps.a"),
        ("{{ steps.a.text }}", "steps.a.text"),
    ):
        with pytest.raises(SpecError) as raised:
            load_workflow(workflow(prompt), settings)
        assert [problem.split(": ", 2)[2] for problem in raised.value.problems] == [
            f"{read}: a step's answer is steps.a.output"
        ], prompt


def test_an_agents_template_is_named_in_the_problems_it_has(tmp_path: Path) -> None:
    project = Project(tmp_path / "p", {"tiers": {"light": {"models": ["ollama/m"], "local": True}}})
    project.agent("writer", system="About {{ inputs.topic }}.", prompt="Write.")
    path = project.workflow({"name": "w", "steps": [{"id": "a", "agent": "writer"}]})
    with pytest.raises(SpecError) as raised:
        load_workflow(path, load_settings(project.config))
    assert [problem.split(": ", 1)[1] for problem in raised.value.problems] == [
        "steps[0].agent: system: unknown input 'topic'"
    ]


def test_an_agents_unknown_tier_is_said_at_the_agent_file(tmp_path: Path) -> None:
    project = Project(tmp_path / "p", {"tiers": {"light": {"models": ["ollama/m"], "local": True}}})
    agent = project.agent("heavy", tier="hevy", prompt="hi")
    steps: list[dict[str, Any]] = [{"id": "a", "agent": "heavy"}, {"id": "b", "agent": "heavy"}]
    path = project.workflow({"name": "w", "steps": steps})
    settings = load_settings(project.config)
    with pytest.raises(SpecError) as raised:
        load_workflow(path, settings)
    assert raised.value.problems == [f"{agent}:2: tier: unknown tier 'hevy'; tiers are light"]
    # Where every step names its own tier, the agent's is never used: nothing to refuse.
    for step in steps:
        step["tier"] = "light"
    load_workflow(project.workflow({"name": "w", "steps": steps}), settings)


def test_too_many_steps_for_max_steps(tmp_path: Path) -> None:
    project_dir = tmp_path / "p"
    (project_dir / "agents").mkdir(parents=True)
    (project_dir / "agents" / "a.yaml").write_text("name: a\nprompt: hi\n")
    (project_dir / "tierflow.yaml").write_text(
        "max_steps: 2\ntiers: {light: {models: [llamacpp/smollm2-135m], local: true}}\n"
    )
    steps = "".join(f"  - {{id: s{i}, agent: a}}\n" for i in range(3))
    (project_dir / "w.yaml").write_text(f"name: w\nsteps:\n{steps}")
    with pytest.raises(SpecError, match="3 steps is over max_steps \\(2\\)"):
        load_workflow(project_dir / "w.yaml", load_settings(project_dir / "tierflow.yaml"))


def test_json_schema_describes_each_file_kind() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"workflow", "agent", "config"}
    assert schemas["workflow"]["additionalProperties"] is False
    assert "steps" in schemas["workflow"]["required"]
    assert "tiers" in schemas["config"]["properties"]
