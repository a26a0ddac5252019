"""Hostile files: every one is exit 2 with FILE:LINE and a clear message, found by linear checks.

The corpus in tests/bad/files holds readable cases; the ones here are built in
code because they are binary, huge or deeply nested.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from orchestrator.errors import SpecError
from orchestrator.loading import read_yaml
from orchestrator.validation import validate_paths

BAD = REPO / "tests" / "bad"
CONFIG = str(BAD / "tierflow.yaml")
HEAD = "name: hostile\ninputs: {ticket: {type: string}}\nsteps:\n"


def step(**fields: str) -> str:
    body = ", ".join(f"{key}: {value}" for key, value in {"agent": "classifier", **fields}.items())
    return f"  - {{{body}}}\n"


def _chain(count: int, max_steps: int | None = None) -> bytes:
    lines = [f"name: chain\nmax_steps: {max_steps}\n" if max_steps else "name: chain\n"]
    lines.append("inputs: {ticket: {type: string}}\nsteps:\n  - {id: s0, agent: classifier}\n")
    lines += [f"  - {{id: s{i}, agent: classifier, needs: [s{i - 1}]}}\n" for i in range(1, count)]
    return "".join(lines).encode()


def _many_steps() -> bytes:
    steps = "".join(f"  - {{id: s{i}, agent: classifier}}\n" for i in range(24000))
    text = (HEAD + steps).encode()
    assert len(text) < 1024 * 1024
    return text


CASES: dict[str, tuple[Callable[[], bytes], int, str]] = {
    # name: (file bytes, line expected, text expected in the message)
    "control_character": (
        lambda: (HEAD + step(id="a", prompt='"x\x7fy"')).encode(),
        4,
        "control character U+007F",
    ),
    "nul_byte": (lambda: (HEAD + step(id="a", prompt="x\x00")).encode(), 4, "U+0000"),
    "utf16": (lambda: (HEAD + step(id="a")).encode("utf-16"), 1, "UTF-16"),
    "utf16_without_bom": (lambda: (HEAD + step(id="a")).encode("utf-16-le"), 1, "UTF-16"),
    "latin1": (lambda: (HEAD + step(id="a", prompt="caf\xe9")).encode("latin-1"), 4, "not UTF-8"),
    "deep_flow_yaml": (
        lambda: (HEAD + step(id="a") + "description: " + "[" * 2000 + "]" * 2000 + "\n").encode(),
        5,
        "nested deeper than",
    ),
    "deep_block_yaml": (
        lambda: ("name: deep\nx:\n  " + "- " * 2000 + "1\n").encode(),
        3,
        "nested deeper than",
    ),
    "deep_parentheses": (
        lambda: (HEAD + step(id="a", when='"' + "(" * 2000 + "1" + ")" * 2000 + '"')).encode(),
        4,
        "steps[0].when: bad expression: nested",
    ),
    "nested_for": (
        lambda: (
            HEAD + step(id="a", prompt='"' + "{% for i in [1] %}" * 20 + "{% endfor %}" * 20 + '"')
        ).encode(),
        4,
        "steps[0].prompt: bad template: nested",
    ),
    "long_chain": (lambda: _chain(1200, 5000), 4, "1200 steps is over the limit of 1000"),
    "long_agent_name": (
        lambda: (HEAD + step(id="a", agent="a" * 256)).encode(),
        4,
        "steps[0].agent: String should have at most 64 characters",
    ),
    "agent_outside_agents": (
        lambda: (HEAD + step(id="a", agent="../files/cycle")).encode(),
        4,
        "steps[0].agent: '../files/cycle': write lower-case letters, digits, '_' and",
    ),
    "huge_template": (
        lambda: (HEAD + step(id="a", prompt='"' + "{{ inputs.ticket }}" * 40000 + '"')).encode(),
        4,
        "steps[0].prompt: bad template: more than 10,000 tokens",
    ),
    "huge_expression": (
        lambda: (HEAD + step(id="a", when='"[' + "1," * 100000 + '1]"')).encode(),
        4,
        "steps[0].when: bad expression: more than 10,000 tokens",
    ),
    "templates_over_the_file_budget": (
        lambda: (
            HEAD
            + "".join(
                step(id=f"s{i}", prompt=f'"{i}' + "{{ inputs.ticket }}" * 1500 + '"')
                for i in range(20)
            )
        ).encode(),
        4 + 6,
        "steps[6].prompt: the templates and expressions of this workflow come to more than 40,000",
    ),
    "many_steps": (_many_steps, 10001, "more than 50,000 keys, values and list items"),
    "long_step_id": (
        lambda: (HEAD + step(id="s" * 300)).encode(),
        4,
        "steps[0].id: String should have at most 64 characters",
    ),
    "duplicate_key": (
        lambda: (HEAD + step(id="a") + "name: again\n").encode(),
        5,
        "name: duplicate key 'name' (first at line 1)",
    ),
    "duplicate_nested_key": (
        lambda: (HEAD + "  - id: a\n    agent: classifier\n    id: b\n").encode(),
        6,
        "steps[0].id: duplicate key 'id' (first at line 4)",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_refused_with_file_line_and_message(tmp_path: Path, name: str) -> None:
    make, line, text = CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(make())
    problems, _ = validate_paths([path], config=CONFIG)
    assert problems, f"{name} was accepted"
    assert any(p.startswith(f"{path}:{line}: ") and text in p for p in problems), problems


def test_a_long_chain_within_the_limits_is_checked_and_accepted(tmp_path: Path) -> None:
    path = tmp_path / "chain.yaml"
    path.write_bytes(_chain(1000, 1000))
    assert validate_paths([path], config=CONFIG) == ([], 1)


def test_keys_that_differ_as_yaml_values_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text('a: {1: int, "1": str}\nb: {x: 1}\nc: {x: 2}\n')
    assert read_yaml(path).data == {"a": {1: "int", "1": "str"}, "b": {"x": 1}, "c": {"x": 2}}


def test_each_problem_is_one_line_whatever_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "tierflow.yaml"
    # A model name with a line break in it, quoted back in the message.
    path.write_text(
        'tiers: {light: {models: [llamacpp/smollm2-135m]}}\nreference_model: "openai/gpt-4.1\\n- x"\n'
    )
    [problem], _ = validate_paths([path], config=str(path))
    assert problem.startswith(f"{path}:2: reference_model: no known price for openai/gpt-4.1 - x")
    assert len(problem.splitlines()) == 1, problem


def test_a_bad_template_in_a_literal_block_names_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(
        "name: w\nsteps:\n  - id: s\n    agent: writer\n    tier: light\n"
        "    prompt: |\n      line one\n\n      line three {{ inputs.x | upcase }}\n"
    )
    problems, _ = validate_paths([path], config=CONFIG)
    said = f"{path}:9: steps[0].prompt: bad template: No filter named 'upcase'"
    assert any(problem.startswith(said) for problem in problems), problems


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("name: x\nsteps:\n\t- id: a\n", "3: (file): invalid YAML: found character that cannot"),
        ("name: x\nsteps:\n\t- id: a\n", "(a tab: YAML takes spaces, not tabs)"),
        ("steps:\n  - id: a\n   agent: x\n", "3: (file): invalid YAML: did not find expected '-'"),
        ("steps:\n  - id: a\n   agent: x\n", "(check the indentation: items of one list line up)"),
        ("steps:\n  - prompt: Say: hi\n", "(quote a value that holds ': ', or check the"),
        ('steps:\n  - prompt: "Say\n', "(a quote left open?)"),
    ],
)
def test_the_yaml_parsers_words_come_with_what_they_usually_mean(
    tmp_path: Path, text: str, said: str
) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as raised:
        read_yaml(path)
    [problem] = raised.value.problems
    assert problem.startswith(f"{path}:") and said in problem, problem
