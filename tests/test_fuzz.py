"""Fuzzed workflow, agent and tierflow.yaml files through ``tierflow validate``.

Every case must exit 0 (valid) or 2 (bad input, one message per problem), never
1, never a traceback, never "internal error", and finish within a few seconds.
Expressions from the same grammar are also evaluated against fuzzed inputs: each
gives a value or the step's error, never anything else.

Hypothesis runs derandomized (the same cases every run) with a fixed number of
examples, so the test is repeatable and its time bounded.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.templates import Expression, Template, TemplateProblem

CASE_SECONDS = 20  # a hang guard per case, far above what a case takes
FILES_CASES = 150
EXPRESSION_CASES = 300

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# --- the grammar ------------------------------------------------------------------

NAMES = ["a", "w", "light", "frontier", "s0", "s1", "items", "keys", "ticket", "x" * 70, "A B", ""]
numbers = st.one_of(
    st.integers(-5, 12),
    st.sampled_from([0, 10**8, 3 * 10**9, 2**63, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
literals = st.one_of(
    numbers.map(repr),
    st.sampled_from(
        ["'a'", "''", "'%9999999999s'", "'{:99999999999}'", "none", "true", "[]", "{}"]
    ),
    st.text(max_size=6).map(repr),
)
references = st.sampled_from(
    [
        "inputs.ticket",
        "inputs.items",
        "inputs.keys",
        "inputs.n",
        "steps.s0.output",
        "steps.s0.output.items",
        "item",
        "output",
        "run.id",
        "inputs.__class__",
        "cycler.__init__",
        "lipsum",
        "range",
    ]
)
BINARY = ["+", "-", "*", "/", "//", "%", "**", "~", "and", "or", "==", "<", ">=", "in"]
FILTERS = [
    "length",
    "list",
    "sum",
    "upper",
    "join",
    "tojson",
    "string",
    "center(99999999999)",
    "replace('', 'ab')",
    "batch(3000000000, 'x')",
    "join(inputs.ticket)",
    "format(1)",
    "indent(99999999)",
    "slice(99999999999)",
    "unknown_filter",
]
CALLS = ["upper()", "ljust(3000000000)", "items()", "keys()", "get('a')", "join([1])", "format(1)"]


def _compose(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(BINARY), children).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        st.tuples(children, st.sampled_from(FILTERS)).map(lambda t: f"({t[0]} | {t[1]})"),
        st.tuples(children, st.sampled_from(CALLS)).map(lambda t: f"{t[0]}.{t[1]}"),
        children.map(lambda c: f"not {c}"),
        children.map(lambda c: f"-{c}"),
        children.map(lambda c: f"range({c})"),
        st.lists(children, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        st.tuples(children, children).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
    )


expressions = st.recursive(st.one_of(literals, references), _compose, max_leaves=8)
# Also text that is not an expression at all: unbalanced brackets, tags, control characters.
broken = st.text(
    alphabet=st.sampled_from(list("()[]{}%|~'\".:+*-/ abc01\x00\x7f\u2028é{")), max_size=30
)
templates = st.one_of(
    expressions.map(lambda e: "{{ " + e + " }}"),
    st.tuples(expressions, expressions).map(
        lambda t: "{% for x in " + t[0] + " %}{{ x ~ " + t[1] + " }}{% endfor %}"
    ),
    expressions.map(lambda e: "{% if " + e + " %}yes{% else %}no{% endif %}"),
    expressions.map(lambda e: "{% set y = " + e + " %}{{ y }}{{ y }}"),
    expressions.map(lambda e: "{% macro m(v) %}{{ m(v) }}{% endmacro %}{{ m(" + e + ") }}"),
    broken,
    st.text(max_size=40),
)
scalars = st.one_of(
    st.none(), st.booleans(), numbers, st.text(max_size=12), st.sampled_from(NAMES), expressions
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.sampled_from(["type", "$ref", "items", "a", "properties", "enum"]),
            children,
            max_size=3,
        ),
    ),
    max_leaves=10,
)
schemas = st.one_of(
    st.none(),
    st.sampled_from(
        [
            {"type": "object", "properties": {"items": {"type": "array"}}, "required": ["items"]},
            {"$ref": "http://127.0.0.1:9/x.json"},
            {"$ref": "#/$defs/nope"},
            {"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n"},
            {"type": 5},
            {"enum": []},
        ]
    ),
    st.dictionaries(
        st.sampled_from(["type", "properties", "$ref", "items", "enum"]), values, max_size=3
    ),
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value from ``strategy`` now and then, else the key left out (None here)."""
    return st.one_of(st.none(), st.none(), strategy)


@st.composite
def steps(draw: st.DrawFn, index: int) -> dict[str, Any]:
    step: dict[str, Any] = {
        "id": draw(st.sampled_from([f"s{index}", "s0", "BAD", "x" * 70])),
        "agent": "a",
    }
    if draw(st.integers(0, 5)) == 0:
        step["agent"] = draw(st.sampled_from([*NAMES, "../agents/a", "b"]))
    for key, strategy in (
        ("tier", st.sampled_from(["light", "light", "frontier", "auto", "nope", 3])),
        ("prompt", templates),
        ("when", expressions),
        ("for_each", expressions),
        ("checks", st.lists(expressions, max_size=2)),
        ("needs", st.lists(st.sampled_from(["s0", "s1", "s2", "zz"]), max_size=2)),
        ("output", schemas),
        ("sensitive", st.booleans()),
        ("max_tokens", st.one_of(st.integers(1, 100), numbers)),
        ("timeout_s", st.one_of(st.integers(1, 100), numbers)),
        ("junk", st.one_of(*[st.none()] * 8, values)),
    ):
        value = draw(maybe(strategy))
        if value is not None:
            step[key] = value
    return step


@st.composite
def fuzzed_workflows(draw: st.DrawFn) -> dict[str, Any]:
    inputs = draw(
        st.dictionaries(
            st.sampled_from(["ticket", "items", "keys", "n", "get"]),
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["string", "integer", "array", "object", "nope"]),
                    "default": values,
                    "enum": st.lists(scalars, max_size=3),
                    "items": schemas,
                    "confidential": st.booleans(),
                },
            ),
            max_size=3,
        )
    )
    count = draw(st.integers(1, 3))
    workflow: dict[str, Any] = {
        "name": draw(st.sampled_from(["w", "w", "w", "Bad Name", "w" * 70, "ok-1"])),
        "inputs": inputs,
        "steps": [draw(steps(i)) for i in range(count)],
    }
    for key, strategy in (
        (
            "budget",
            st.dictionaries(
                st.sampled_from(["per_run_usd", "daily_usd", "downgrade_at", "downgrade_to"]),
                numbers | st.sampled_from(["light"]),
                max_size=3,
            ),
        ),
        ("max_steps", numbers),
        (
            "schedule",
            st.lists(
                st.fixed_dictionaries(
                    {"cron": st.sampled_from(["0 6 * * 1-5", "* * *", "99 * * * *"])},
                    optional={"inputs": values},
                ),
                max_size=1,
            ),
        ),
        ("version", scalars),
    ):
        value = draw(maybe(strategy))
        if value is not None:
            workflow[key] = value
    return workflow


@st.composite
def plausible_workflows(draw: st.DrawFn) -> dict[str, Any]:
    """Workflows right in every field but their expressions, so checking goes all the way."""
    steps: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 3))):
        step: dict[str, Any] = {
            "id": f"s{index}",
            "agent": "a",
            "tier": draw(st.sampled_from(["light", "light", "frontier"])),
        }
        if index and draw(st.booleans()):
            step["needs"] = [f"s{index - 1}"]
        for key, strategy in (
            ("prompt", templates),
            ("when", expressions),
            ("for_each", expressions),
            ("checks", st.lists(expressions, max_size=2)),
            ("output", schemas),
        ):
            value = draw(maybe(strategy))
            if value is not None:
                step[key] = value
        steps.append(step)
    return {
        "name": "w",
        "inputs": {
            "ticket": {"type": "string", "confidential": draw(st.booleans())},
            "items": {"type": "array", "default": []},
            "keys": {"type": "string", "default": "k"},
            "n": {"type": "integer", "default": 1},
        },
        "steps": steps,
    }


GOOD_AGENT = {"name": "a", "system": "You help.", "prompt": "{{ inputs.ticket }}"}


@st.composite
def fuzzed_agents(draw: st.DrawFn) -> dict[str, Any]:
    agent: dict[str, Any] = {"name": draw(st.sampled_from(["a"] * 6 + ["b", "x" * 300]))}
    for key, strategy in (
        ("system", templates),
        ("prompt", templates),
        ("temperature", st.one_of(st.floats(0, 2), st.floats(0, 2), numbers)),
        ("max_tokens", st.one_of(st.integers(1, 100), st.integers(1, 100), numbers)),
        ("tier", st.sampled_from(["light", "nope"])),
    ):
        value = draw(maybe(strategy))
        if value is not None:
            agent[key] = value
    return agent


model_entries = st.one_of(
    st.sampled_from(
        [
            "llamacpp/smollm2-135m",
            "ollama/qwen2.5:7b",
            "openai/gpt-4o-mini",
            "nope",
            "openai/unpriced-xyz",
        ]
    ),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["ollama/qwen2.5:7b", "openai/gpt-4o-mini"])},
        optional={
            "api_base": st.sampled_from(["http://127.0.0.1:9", "not a url"]),
            "timeout_s": numbers,
        },
    ),
)


GOOD_CONFIG: dict[str, Any] = {
    "tiers": {
        "light": {"local": True, "models": ["llamacpp/smollm2-135m", "ollama/qwen2.5:7b"]},
        "frontier": {"models": ["openai/gpt-4o-mini"]},
    },
    "reference_model": "openai/gpt-4.1",
}


@st.composite
def fuzzed_configs(draw: st.DrawFn) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tiers": {
            "light": {
                "models": draw(st.lists(model_entries, min_size=1, max_size=2)),
                "local": draw(st.booleans()),
            },
            **draw(
                st.dictionaries(
                    st.sampled_from(["frontier", "auto", "x" * 70]),
                    st.fixed_dictionaries({"models": st.lists(model_entries, max_size=2)}),
                    max_size=1,
                )
            ),
        }
    }
    for key, strategy in (
        (
            "database",
            st.sampled_from(
                ["sqlite:///t.db", "tierflow.db", "mysql://x/y", "postgresql://h/d", "::"]
            ),
        ),
        ("broker", st.sampled_from(["redis://127.0.0.1:9/0", "localhost", "kafka://x"])),
        ("lease_ttl_s", numbers),
        ("max_steps", numbers),
        (
            "prices",
            st.dictionaries(
                st.sampled_from(["ollama/qwen2.5:7b", "openai/gpt-4o-mini"]),
                st.dictionaries(
                    st.sampled_from(["input", "output", "per_hour"]), numbers, max_size=2
                ),
                max_size=1,
            ),
        ),
        (
            "budget",
            st.dictionaries(st.sampled_from(["daily_usd", "monthly_usd"]), numbers, max_size=2),
        ),
        (
            "escalation",
            st.fixed_dictionaries(
                {},
                optional={
                    "on": st.lists(st.sampled_from(["error", "timeout", "nope"]), max_size=2),
                    "max_attempts": numbers,
                },
            ),
        ),
        ("reference_model", st.sampled_from(["openai/gpt-4.1", "nope/x"])),
    ):
        value = draw(maybe(strategy))
        if value is not None:
            config[key] = value
    return config


# Mostly a configuration and an agent that load, so that workflows get checked through.
configs = st.one_of(st.just(GOOD_CONFIG), st.just(GOOD_CONFIG), fuzzed_configs())
agents = st.one_of(st.just(GOOD_AGENT), fuzzed_agents())
workflows = st.one_of(plausible_workflows(), fuzzed_workflows())


def _dump(data: dict[str, Any]) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


mutations = st.one_of(
    st.just(None),
    st.tuples(
        st.sampled_from(["insert", "replace", "truncate"]),
        st.integers(0, 2000),
        st.binary(max_size=8),
    ),
    st.tuples(
        st.just("insert"),
        st.integers(0, 2000),
        st.sampled_from(
            [
                b"\x7f",
                b"\x00",
                b"\xff\xfe",
                b"&a ",
                b"*a",
                b"!!python/object:os.system ",
                b"{{",
                b"\n  - ",
                b"\t",
            ]
        ),
    ),
)


def mutate(raw: bytes, mutation: Any) -> bytes:
    if mutation is None:
        return raw
    kind, at, payload = mutation
    at = min(at, len(raw))
    if kind == "insert":
        return raw[:at] + payload + raw[at:]
    if kind == "replace":
        return raw[:at] + payload + raw[at + len(payload) :]
    return raw[:at]


# --- running a case -------------------------------------------------------------------


class _Slow(Exception):
    pass


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    """Interrupt the case if it runs past ``seconds``: a hang is a failure, not a wait."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Slow(f"the case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(*argv: str) -> tuple[int, str]:
    """``tierflow ARGV`` in this process, as the console script runs it: exit code and output."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = ["tierflow", *argv]
    try:
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
            hang_guard(CASE_SECONDS),
        ):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return code, out.getvalue()


@contextlib.contextmanager
def memory_guard() -> Iterator[None]:
    """Cap this process's address space 2 GiB above its size now, for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = size + 2 * 1024**3
    resource.setrlimit(
        resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard)
    )
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@settings(FUZZ, max_examples=FILES_CASES)
@given(
    workflow=workflows,
    agent=agents,
    config=configs,
    target=st.sampled_from(["workflow", "agent", "config"]),
    mutation=mutations,
)
def test_fuzzed_files_exit_0_or_2_with_no_traceback(
    scratch: Path,
    workflow: dict[str, Any],
    agent: dict[str, Any],
    config: dict[str, Any],
    target: str,
    mutation: Any,
) -> None:
    (scratch / "agents").mkdir(exist_ok=True)
    files = {
        "config": (scratch / "tierflow.yaml", _dump(config)),
        "agent": (scratch / "agents" / "a.yaml", _dump(agent)),
        "workflow": (scratch / "w.yaml", _dump(workflow)),
    }
    for name, (path, raw) in files.items():
        path.write_bytes(mutate(raw, mutation) if name == target else raw)
    paths = [str(path) for path, _ in files.values()]
    with memory_guard():
        code, output = run_cli("validate", *paths, "--config", paths[0])
    assert code in (0, 2), output
    assert "Traceback" not in output and "internal error" not in output, output
    if code == 2:
        assert all(
            line.startswith(tuple(paths)) or line.startswith("$")
            for line in output.splitlines()
            if line
        ), output


contexts = st.fixed_dictionaries(
    {
        "inputs": st.fixed_dictionaries(
            {"ticket": st.text(max_size=20), "items": values, "keys": values, "n": numbers}
        ),
        "steps": st.just({"s0": {"output": {"items": [1, 2], "keys": "k"}}}),
        "item": values,
        "output": values,
        "run": st.just({"id": "r", "workflow": "w"}),
    }
)


@settings(FUZZ, max_examples=EXPRESSION_CASES)
@given(source=st.one_of(expressions, templates), context=contexts)
def test_fuzzed_expressions_give_a_value_or_the_steps_error(
    source: str, context: dict[str, Any]
) -> None:
    with memory_guard(), hang_guard(CASE_SECONDS):
        try:
            compiled: Expression | Template = (
                Template(source) if "{{" in source or "{%" in source else Expression(source)
            )
            if isinstance(compiled, Template):
                compiled.render(context)
            else:
                compiled.evaluate(context)
        except TemplateProblem as exc:
            assert "out of memory" not in str(exc)
