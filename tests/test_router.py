"""``tier: auto``: the router learns from the ledger where a step should start."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator import router
from orchestrator.router import Outcome
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

LADDER = ["light", "standard", "frontier"]


def rows(*pairs: tuple[str, str]) -> list[Outcome]:
    return [Outcome(tier, outcome, 0.0, 0.0) for tier, outcome in pairs]


def test_a_pass_counts_for_the_tiers_above_and_a_failure_only_where_it_was() -> None:
    rates = router.pass_rates(rows(("light", "ok"), ("standard", "invalid_output")), LADDER)
    # light's pass (weight 1) counts at every tier; standard's failure (0.97) there only.
    assert rates == pytest.approx([2 / 3, 2 / 3.97, 2 / 3])
    # Errors and timeouts say nothing of quality.
    assert router.pass_rates(rows(("light", "error"), ("light", "timeout")), LADDER) == [0.5] * 3


def test_older_labels_weigh_less() -> None:
    newest_fail = router.pass_rates(rows(("light", "invalid_output"), ("light", "ok")), ["light"])
    newest_pass = router.pass_rates(rows(("light", "ok"), ("light", "invalid_output")), ["light"])
    assert newest_fail[0] < 0.5 < newest_pass[0]


def test_a_cheap_tier_is_tried_first_only_while_its_pass_rate_beats_its_price_ratio() -> None:
    # Starting cheap pays iff p > c(cheap) / E(next): here 0.3 / 1.0.
    assert router.choose([0.31, 1.0], [0.3, 1.0]) == 0
    assert router.choose([0.29, 1.0], [0.3, 1.0]) == 1
    # Three tiers: a middle tier that rarely passes is skipped.
    assert router.choose([0.05, 0.05, 1.0], [0.1, 0.3, 1.0]) == 2
    assert router.choose([0.95, 0.05, 1.0], [0.01, 0.3, 1.0]) == 0


def test_costs_come_from_the_ledger_and_unknown_tiers_are_dearer() -> None:
    history = [
        Outcome("light", "ok", 0.0, 2000.0),  # $0, 2 s of a local model
        Outcome("standard", "ok", 0.002, 100.0),
        Outcome("standard", "ok", 0.004, 100.0),
    ]
    assert router.costs(history, LADDER, 0.0001) == pytest.approx([0.0002, 0.003, 0.03])
    assert router.costs([], LADDER, 0.0001) == pytest.approx([1e-6, 1e-5, 1e-4])


def test_exploring_starts_below_the_choice() -> None:
    history = [Outcome("light", "invalid_output", 0.0, 1000.0)] * 30  # $0, 1 s each
    chosen = router.route(history, ["light", "frontier"], explore=0.0, latency_usd_per_s=0.1)
    assert (chosen.start, chosen.routed) == (1, "auto")
    explored = router.route(
        history, ["light", "frontier"], explore=1.0, latency_usd_per_s=0.1, rng=random.Random(1)
    )
    assert (explored.start, explored.routed) == (0, "explore")
    assert explored.expected_pass == pytest.approx(router.pass_rates(history, ["light"])[0])


def auto_project(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, **router: Any
) -> Project:
    """Light costs 0.3 of the frontier per call: starting light pays while it passes > 30%."""
    project = Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier),
            "prices": {
                "ollama/llama3.2:1b": {"input": 3, "output": 0},
                "openai/gpt-4o-mini": {"input": 10, "output": 0},
            },
            "router": {"explore": 0.0, **router},
        },
    )
    project.workflow(
        {
            "name": "auto",
            "steps": [
                {"id": "pick", "agent": "helper", "tier": "auto", "output": {"type": "object"}}
            ],
        }
    )
    ollama.default = Reply(text="not json", prompt_tokens=1000, completion_tokens=0)
    frontier.default = Reply(text='{"ok": true}', prompt_tokens=1000, completion_tokens=0)
    return project


def starts(project: Project, runs: int) -> list[tuple[str, str | None]]:
    found = []
    for _ in range(runs):
        result = project.run("auto")
        assert result.status == "succeeded"
        first = project.calls(result.run_id)[0]
        found.append((first["tier_used"], first["routed"]))
    return found


def test_auto_learns_to_skip_a_tier_that_keeps_failing(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = auto_project(tmp_path, ollama, frontier)
    # Prior 0.5, then 1/3 after one failure: still above 0.3. After two (weighted
    # 1 and 0.97) it is 1/3.97 = 0.25: the frontier is cheaper to start at.
    assert starts(project, 4) == [
        ("light", "auto"),
        ("light", "auto"),
        ("frontier", "auto"),
        ("frontier", "auto"),
    ]
    last_run = project.calls(project.store().runs()[0]["id"])
    assert [c["tier_used"] for c in last_run] == ["frontier"]  # one call: the light one is skipped
    # Newest first: frontier ok (run 3), frontier ok and light failed (run 2), the same
    # (run 1), weighing 1, 0.97, 0.97², 0.97³, 0.97⁴: the frontier's passes count.
    passes = 1 + 1 + 0.97 + 0.97**3
    assert last_run[0]["expected_pass"] == pytest.approx(passes / (passes + 1), abs=1e-4)
    shown = tierflow("show", project.store().runs()[0]["id"], cwd=project.root)
    assert "routed: auto, expected pass rate 0.80" in shown.stdout


def test_auto_explores_and_finds_a_tier_that_got_better(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = auto_project(tmp_path, ollama, frontier, explore=1.0)
    assert [tier for tier, _ in starts(project, 3)] == ["light", "light", "light"]
    # Every start the router would put at the frontier goes lower instead.
    calls = project.calls(project.store().runs()[0]["id"])
    assert calls[0]["routed"] == "explore"
    # The local model got better: the explored start passes, and the next run's
    # estimate (1 pass against weighted failures) is back above 0.3 on its own.
    ollama.default = Reply(text='{"ok": true}', prompt_tokens=1000, completion_tokens=0)
    assert starts(project, 2) == [("light", "explore"), ("light", "auto")]


def test_a_written_tier_is_recorded_as_written(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow({"name": "one", "steps": [{"id": "only", "agent": "helper", "tier": "light"}]})
    result = project.run("one")
    [call] = project.calls(result.run_id)
    assert (call["routed"], call["expected_pass"], call["route_key"]) == ("written", None, None)


def test_a_changed_prompt_starts_afresh(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = auto_project(tmp_path, ollama, frontier)
    assert [tier for tier, _ in starts(project, 3)][-1] == "frontier"
    path = project.root / "workflows" / "auto.yaml"
    path.write_text(path.read_text().replace("agent: helper", "agent: helper\n  prompt: again"))
    assert starts(project, 1) == [("light", "auto")]


def test_bad_feedback_on_local_answers_moves_the_start_up(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = auto_project(tmp_path, ollama, frontier)
    assert starts(project, 1) == [("light", "auto")]  # invalid, then the frontier: both priced
    ollama.default = Reply(text='{"ok": true}', prompt_tokens=1000, completion_tokens=0)
    first = project.run("auto")
    second = project.run("auto")
    assert [project.calls(r.run_id)[0]["tier_used"] for r in (first, second)] == ["light"] * 2
    assert [len(project.calls(r.run_id)) for r in (first, second)] == [1, 1]
    # The answers passed their schema, but a person says they were wrong.
    for result in (first, second):
        said = tierflow(
            "feedback", result.run_id[:10], "pick", "--bad", "--note", "wrong", cwd=project.root
        )
        assert said.returncode == 0, said.stderr
        assert said.stdout.strip() == f"bad: {result.run_id} pick"
    # The labels stand instead of the two passes: light has failed three times
    # (weights 1, .97 and .91 with the first run's), 1/3.88 < 0.3: start at the frontier.
    assert starts(project, 1) == [("frontier", "auto")]


def test_feedback_names_what_is_wrong(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow({"name": "one", "steps": [{"id": "only", "agent": "helper", "tier": "light"}]})
    run_id = project.run("one").run_id
    cases = [
        (
            ("feedback", run_id, "onyl", "--good"),
            f"run {run_id} has no step 'onyl'; its steps: only",
        ),
        (("feedback", "nope", "only", "--good"), "no run 'nope'"),
        (("feedback", run_id, "only"), "say --good or --bad"),
    ]
    for args, message in cases:
        said = tierflow(*args, cwd=project.root)
        assert said.returncode == 2 and message in said.stderr, said.stderr
        assert "Traceback" not in said.stderr


def test_the_items_of_a_step_share_one_read_of_its_history(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    import asyncio

    from sqlalchemy import event

    project = auto_project(tmp_path, ollama, frontier)
    project.workflow(
        {
            "name": "many",
            "inputs": {"items": {"type": "array", "default": list(range(6))}},
            "steps": [
                {
                    "id": "each",
                    "agent": "helper",
                    "tier": "auto",
                    "for_each": "inputs['items']",
                    "prompt": "item {{ item }}",
                    "output": {"type": "object"},
                }
            ],
        }
    )
    runner, loaded, store = project.runner("many")
    reads: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "route_key" in statement and "ORDER BY model_calls.id DESC" in statement:
            reads.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        for _ in range(2):
            result = asyncio.run(runner.run(loaded, {}))
            assert result.status == "succeeded"
    finally:
        store.engine.dispose()
    assert len(reads) == 2  # one per run, not one per item
    # Every item was routed from it: the second run's items start on the frontier,
    # after the first run's six light failures.
    calls = project.calls(result.run_id)
    assert {c["tier_used"] for c in calls} == {"frontier"} and len(calls) == 6
    assert all(c["routed"] == "auto" for c in calls)
