"""Expressions and prompts: data before methods, runtime errors that fail the step, bounded work.

Expressions run in Jinja2's sandbox. What a workflow reads is data first: an
input called ``items`` is that input, not ``dict.items``. An expression that
raises is the workflow's error: the step fails, naming itself and the
expression, and no model is asked again for it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow

from orchestrator.templates import Expression, Template, TemplateProblem
from orchestrator.testing import OllamaServer, OpenAIServer

METHOD_NAMES = ("items", "keys", "values", "get", "pop", "update", "copy")


def last_prompt(request: dict[str, Any]) -> str:
    return str(request["messages"][-1]["content"])


def step_rows(project: Project, run_id: str) -> list[dict[str, Any]]:
    store = project.store()
    try:
        found = store.run(run_id)
    finally:
        store.engine.dispose()
    assert found is not None
    return list(found["steps"])


# --- data first -----------------------------------------------------------------


def test_inputs_named_like_mapping_methods_are_the_inputs(
    project: Project, ollama: OllamaServer
) -> None:
    inputs: dict[str, Any] = {"items": {"type": "array", "default": ["a", "b"]}}
    inputs.update({name: {"type": "string", "default": name.upper()} for name in METHOD_NAMES[1:]})
    shown = " ".join(f"{{{{ inputs.{name} }}}}" for name in METHOD_NAMES[1:])
    project.workflow(
        {
            "name": "methods",
            "inputs": inputs,
            "steps": [
                {
                    "id": "each",
                    "agent": "helper",
                    "tier": "light",
                    "for_each": "inputs.items",
                    "when": "inputs.keys == 'KEYS'",
                    "prompt": "{{ item }} " + shown,
                }
            ],
        }
    )
    result = project.run("methods")
    assert result.status == "succeeded", result.error
    prompts = sorted(last_prompt(r) for r in ollama.chat_requests())
    assert prompts == [f"{x} KEYS VALUES GET POP UPDATE COPY" for x in ("a", "b")]


def test_outputs_named_like_mapping_methods_are_the_outputs(
    project: Project, ollama: OllamaServer
) -> None:
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array"}, "keys": {"type": "string"}},
        "required": ["items", "keys"],
    }
    project.workflow(
        {
            "name": "outputs",
            "steps": [
                {"id": "shape", "agent": "helper", "tier": "light", "output": schema},
                {
                    "id": "each",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["shape"],
                    "for_each": "steps.shape.output.items",
                    "checks": ["output == 'fine' and steps.shape.output.keys == 'k'"],
                    "prompt": "{{ item }} {{ steps.shape.output.keys }}",
                },
            ],
        }
    )
    ollama.reply(json.dumps({"items": ["x", "y"], "keys": "k"}), "fine", "fine")
    result = project.run("outputs")
    assert result.status == "succeeded", result.error
    assert sorted(last_prompt(r) for r in ollama.chat_requests()[1:]) == ["x k", "y k"]
    assert result.outputs["each"] == ["fine", "fine"]


def test_an_expression_that_gives_a_missing_field_raises_as_the_step_error() -> None:
    with pytest.raises(TemplateProblem, match=r"when 'inputs\.a\.b' raised UndefinedError"):
        Expression("inputs.a.b", label="when").evaluate({"inputs": {"a": {}}})


def test_methods_still_answer_when_no_key_has_their_name() -> None:
    assert Expression("inputs.keys() | list").evaluate({"inputs": {"a": 1, "b": 2}}) == ["a", "b"]
    assert Expression("inputs.get('a')").evaluate({"inputs": {"a": 1}}) == 1
    assert Expression("inputs['items']").evaluate({"inputs": {"items": [3]}}) == [3]


# --- runtime errors fail the step ---------------------------------------------------


def test_a_raising_when_fails_the_step_naming_it_and_the_expression(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "gate",
            "steps": [
                {
                    "id": "score",
                    "agent": "helper",
                    "tier": "light",
                    "output": {
                        "type": "object",
                        "properties": {"n": {"type": ["integer", "null"]}},
                    },
                },
                {
                    "id": "deep",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["score"],
                    "when": "steps.score.output.n >= 4",
                },
            ],
        }
    )
    ollama.reply(json.dumps({"n": None}))
    result = project.run("gate")
    assert result.status == "failed"
    assert "step 'deep'" in (result.error or "")
    assert "steps.score.output.n >= 4" in (result.error or "")
    assert "TypeError" in (result.error or "")
    rows = {row["step_id"]: row for row in step_rows(project, result.run_id)}
    assert rows["deep"]["status"] == "failed"
    assert all(row["status"] != "running" for row in rows.values())
    assert len(ollama.chat_requests()) == 1 and frontier.chat_requests() == []


@pytest.mark.parametrize(
    ("field", "source"),
    [
        ("for_each", "[1, 2] + inputs.text"),
        ("prompt", "{{ 1 // inputs.zero }}"),
        ("when", "1 / inputs.zero"),
    ],
)
def test_runtime_errors_in_for_each_prompt_and_when_fail_the_step(
    project: Project, ollama: OllamaServer, field: str, source: str
) -> None:
    step: dict[str, Any] = {"id": "only", "agent": "helper", "tier": "light", field: source}
    if field == "for_each":
        step["prompt"] = "{{ item }}"
    project.workflow(
        {
            "name": "raises",
            "inputs": {
                "text": {"type": "string", "default": "x"},
                "zero": {"type": "integer", "default": 0},
            },
            "steps": [step],
        }
    )
    result = project.run("raises")
    assert result.status == "failed"
    assert "step 'only'" in (result.error or "") and source in (result.error or "")
    assert [row["status"] for row in step_rows(project, result.run_id)] == ["failed"]
    assert ollama.chat_requests() == []


def test_a_raising_check_fails_the_step_and_never_escalates(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "checked",
            "steps": [{"id": "only", "agent": "helper", "tier": "light", "checks": ["1/0"]}],
        }
    )
    ollama.reply("an answer")
    result = project.run("checked")
    assert result.status == "failed"
    assert "check '1/0'" in (result.error or "") and "ZeroDivisionError" in (result.error or "")
    assert frontier.chat_requests() == []
    # The light call was made and is in the ledger, settled, not blamed on the model.
    [call] = project.calls(result.run_id)
    assert (call["tier_used"], call["state"], call["outcome"]) == ("light", "settled", "ok")
    assert [row["status"] for row in step_rows(project, result.run_id)] == ["failed"]


def test_the_cli_reports_a_raising_expression_as_a_failed_run(project: Project) -> None:
    project.workflow(
        {
            "name": "divides",
            "inputs": {"zero": {"type": "integer", "default": 0}},
            "steps": [
                {
                    "id": "only",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "hi",
                    "when": "1/inputs.zero",
                }
            ],
        }
    )
    proc = tierflow("run", "divides", "--json", cwd=project.root)
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert "step 'only'" in error and "when '1/inputs.zero' raised ZeroDivisionError" in error


# --- bounded work -------------------------------------------------------------------

# Each case runs in one child process with a 2 GiB address-space limit: without
# the sandbox's bounds these would take minutes or gigabytes, and must fail
# this test rather than the machine.
BOMBS_AT_LOAD = [
    "10 ** (10 ** 8)",
    "'a' * 3000000000",
    "[0] * 3000000000",
    "(('a' * 100000) ~ ('a' * 100000)) * 100000",
    "'a' | center(3000000000)",
    "'%3000000000s' % 'a'",
    "'{:3000000000}'.format('a')",
    "range(10 ** 9) | list",
]
BOMBS_AT_RUN = [
    ("10 ** inputs.n", {"n": 10**8}),
    ("inputs.s * inputs.n", {"s": "a", "n": 3 * 10**9}),
    ("inputs.l * inputs.n", {"l": [0], "n": 3 * 10**9}),
    ("inputs.n * inputs.n * inputs.n * inputs.n", {"n": 10**2000}),
    ("(inputs.s ~ inputs.s) | replace('', inputs.s)", {"s": "a" * 100000}),
    ("inputs.s.join(range(10000) | map('string'))", {"s": "a" * 1000000}),
    ("inputs.s.ljust(inputs.n)", {"s": "a", "n": 3 * 10**9}),
    ("range(inputs.n) | list", {"n": 10**9}),
    ("range(10000) | batch(inputs.n, 'x') | list", {"n": 10**9}),
]
TEMPLATE_BOMBS = [
    # Ten thousand squared iterations: work, not memory.
    "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    # A recursive macro.
    "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    # Output that doubles in a namespace.
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    # A megabyte of output, ten thousand times.
    "{% for i in range(10000) %}{{ inputs.s }}{% endfor %}",
    # Literal text in a loop is output too.
    "{% for i in range(10000) %}{% for j in range(10000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
]

_BOMB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from orchestrator.templates import Expression, Template, TemplateProblem

    cases = json.loads(sys.stdin.read())
    results = []
    for kind, source, inputs in cases:
        try:
            compiled = Expression(source) if kind == "expression" else Template(source)
            if inputs is not None:
                context = {"inputs": inputs}
                if kind == "expression":
                    compiled.evaluate(context)
                else:
                    compiled.render(context)
            results.append("no error")
        except TemplateProblem as exc:
            results.append("refused: " + str(exc))
    print(json.dumps(results))
    """
)


def _limit_memory() -> None:
    limit = 2 * 1024**3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_bombs(cases: list[tuple[str, str, Any]]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing assertion
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return list(json.loads(proc.stdout))


def test_expressions_jinja_would_fold_at_load_are_not_computed_at_load() -> None:
    results = run_bombs([("expression", source, None) for source in BOMBS_AT_LOAD])
    assert results == ["no error"] * len(BOMBS_AT_LOAD)


def test_huge_results_are_refused_at_run_time_naming_the_limit() -> None:
    cases: list[tuple[str, str, Any]] = [("expression", s, {}) for s in BOMBS_AT_LOAD]
    cases += [("expression", s, inputs) for s, inputs in BOMBS_AT_RUN]
    cases += [("template", s, {"s": "a" * 1000000}) for s in TEMPLATE_BOMBS]
    results = run_bombs(cases)
    for (_kind, source, _inputs), result in zip(cases, results, strict=True):
        assert result.startswith("refused: "), (source, result)
        assert "limit" in result or "too" in result, (source, result)


def test_ordinary_work_is_well_inside_the_bounds() -> None:
    many = [{"title": f"t{i}", "body": "b" * 50} for i in range(2000)]
    text = Template("{% for t in inputs.tickets %}{{ t.title }}: {{ t.body }}\n{% endfor %}")
    assert text.render({"inputs": {"tickets": many}}).count("\n") == 2000
    assert Expression("2 ** 64 * 3").evaluate({}) == 3 * 2**64
    assert Expression("('ab' * 1000) | length").evaluate({}) == 2000
    assert Expression("range(1000) | sum").evaluate({}) == 499500
    assert (
        Expression("inputs.s | replace('a', 'bb') | length").evaluate(
            {"inputs": {"s": "a" * 10000}}
        )
        == 20000
    )


def test_a_runtime_bomb_in_when_fails_the_run_cleanly(tmp_path: Path) -> None:
    project = tmp_path / "p"
    (project / "agents").mkdir(parents=True)
    (project / "tierflow.yaml").write_text(
        "database: sqlite:///t.db\ntiers: {light: {local: true, models: [llamacpp/smollm2-135m]}}\n"
    )
    (project / "agents" / "a.yaml").write_text("name: a\nprompt: hi\n")
    (project / "w.yaml").write_text(
        "name: w\ninputs: {n: {type: integer}}\n"
        "steps:\n  - {id: only, agent: a, when: '10 ** inputs.n'}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "w.yaml", "-i", "n=100000000", "--json"],
        capture_output=True,
        text=True,
        cwd=project,
        timeout=300,  # a hang guard
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert "step 'only'" in error and "when '10 ** inputs.n'" in error and "too large" in error


# --- nesting ---------------------------------------------------------------------


def test_nothing_is_evaluated_while_names_are_found() -> None:
    # jinja2.meta folds constants while it looks for names: 0[0] raised there.
    expression = Expression("-(0 if 0[0] else 0)")
    with pytest.raises(TemplateProblem, match="raised UndefinedError"):
        expression.evaluate({})


def test_an_unknown_filter_is_a_template_problem() -> None:
    with pytest.raises(TemplateProblem, match="No filter named 'nope'"):
        Template("{{ 1 | nope }}")
    with pytest.raises(TemplateProblem, match="No test named 'nope'"):
        Expression("1 is nope")


@pytest.mark.parametrize(
    ("kind", "source"),
    [
        ("expression", "(" * 2000 + "1" + ")" * 2000),
        ("expression", "[" * 2000 + "]" * 2000),
        ("expression", "not " * 2000 + "1"),
        ("expression", "- " * 2000 + "1"),
        ("expression", "inputs" + ".a" * 2000),
        ("expression", " + ".join(["1"] * 2000)),
        ("template", "{% for i in [1] %}" * 20 + "{% endfor %}" * 20),
        ("template", "{% if 1 %}" * 200 + "{% endif %}" * 200),
        ("template", "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}"),
    ],
)
def test_deep_nesting_is_refused_when_compiled(kind: str, source: str) -> None:
    with pytest.raises(TemplateProblem, match="nest"):
        Expression(source) if kind == "expression" else Template(source)
