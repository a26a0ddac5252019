"""Calibration: a step's labels turn its raw confidence scores into probabilities."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator import calibration
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def test_too_few_labels_give_no_calibration() -> None:
    assert calibration.fit([(0.9, True)] * 29 + [(0.1, False)]) is None  # 30, one wrong
    assert calibration.fit([(0.9, True)] * 20 + [(0.1, False)] * 4) is None  # 24
    assert calibration.fit([(0.9, True)] * 25 + [(0.1, False)] * 5) is not None


def test_an_honest_signal_keeps_its_order_and_is_shrunk() -> None:
    labelled = [(0.2, False)] * 10 + [(0.5, True)] * 3 + [(0.5, False)] * 7 + [(0.9, True)] * 10
    fitted = calibration.fit(labelled)
    assert fitted is not None and fitted.labels == 30
    assert fitted(0.2) == pytest.approx(1 / 12, abs=1e-6)  # 0 of 10, shrunk by one of each
    assert fitted(0.5) == pytest.approx(4 / 12, abs=1e-6)  # 3 of 10
    assert fitted(0.95) == fitted(0.9) == pytest.approx(11 / 12, abs=1e-6)
    assert fitted(0.0) == fitted(0.2)  # below the first block: the first
    assert fitted(0.7) == fitted(0.5)  # between blocks: the one it falls in


def test_a_confidently_wrong_signal_goes_flat() -> None:
    # The surer the model, the more often wrong: isotonic pools it all into one block.
    labelled = [(0.3, True)] * 15 + [(0.95, False)] * 15
    fitted = calibration.fit(labelled)
    assert fitted is not None
    assert fitted(0.3) == fitted(0.95) == pytest.approx(16 / 32, abs=1e-6)


def test_values_never_fall_as_the_score_rises() -> None:
    import random

    rng = random.Random(7)
    labelled = [(round(rng.random(), 2), rng.random() < 0.6) for _ in range(200)]
    fitted = calibration.fit(labelled)
    assert fitted is not None
    values = [fitted(score / 100) for score in range(101)]
    assert values == sorted(values)
    assert all(0 < value < 1 for value in values)


SURE_AND_WRONG = -0.01  # margin 0.94 on a two-piece answer
UNSURE_AND_RIGHT = -0.5  # margin 0.58


def light(body: dict[str, Any]) -> Reply:
    """Right and unsure on c0-c19, wrong and sure of itself on c20-c39."""
    index = int(body["messages"][-1]["content"].strip()[1:])
    right = index < 20
    return Reply(
        text=json.dumps({"answer": "yes" if right else "no"}),
        logprobs=(UNSURE_AND_RIGHT if right else SURE_AND_WRONG,),
    )


def sure_project(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, **step: Any
) -> Project:
    """A project whose one step, ``say`` of workflow ``sure``, asks for logprob 0.55."""
    project = Project(tmp_path / "p", {"tiers": tiers_for(ollama, frontier)})
    confidence = {"signal": "logprob", "min": 0.55}
    say = {"id": "say", "agent": "helper", **step, "confidence": confidence}
    project.workflow({"name": "sure", "steps": [say]})
    return project


def test_labels_from_eval_calibrate_the_step_and_change_what_escalates(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = sure_project(
        tmp_path, ollama, frontier, tier="light", output={"type": "object", "required": ["answer"]}
    )
    cases = [{"inputs": {"text": f"c{i}"}, "expect": {"say": {"answer": "yes"}}} for i in range(40)]
    project.write("cases.jsonl", "\n".join(json.dumps(case) for case in cases) + "\n")
    ollama.responder = light
    frontier.default = Reply(text='{"answer": "yes"}')

    # Uncalibrated, a sure answer (0.94) passes min 0.55: it is taken, wrong as it is.
    before = project.run("sure", {"text": "c30"})
    assert [c["outcome"] for c in project.calls(before.run_id)] == ["ok"]
    assert project.calls(before.run_id)[0]["raw_confidence"] is None

    # Forty labelled answers from the local model alone: its sure ones were the wrong ones.
    done = tierflow(
        "eval", "sure", "--cases", "cases.jsonl", "-p", "tier:light", "--json", cwd=project.root
    )
    assert done.returncode == 0, done.stderr
    # The eval calibrated nothing with its own verdicts, though it had 30 by case 31.
    [light_policy] = json.loads(done.stdout)["policies"]
    assert light_policy["quality"] == 0.5
    eval_runs = [run for run in project.store().runs(limit=100) if run["eval"]]
    assert len(eval_runs) == 40
    assert all(project.calls(run["id"])[0]["raw_confidence"] is None for run in eval_runs)

    # Calibrated, 0.94 means a one-in-two chance of being right: below 0.55, so it escalates.
    after = project.run("sure", {"text": "c30"})
    first, second = project.calls(after.run_id)
    assert (first["tier_used"], first["outcome"]) == ("light", "low_confidence")
    assert first["raw_confidence"] == pytest.approx(0.9406, abs=1e-3)
    assert first["confidence"] == pytest.approx(0.5)
    assert "(calibrated; raw 0.94" in first["error"]
    assert (second["tier_used"], second["outcome"]) == ("frontier", "ok")
    shown = tierflow("show", after.run_id, cwd=project.root)
    assert "confidence (logprob): 0.500, calibrated (raw 0.941)" in shown.stdout


def test_a_ledger_that_cannot_give_labels_leaves_scores_raw(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    project = sure_project(tmp_path, ollama, frontier, output={"type": "object"})  # tier: auto
    ollama.default = Reply(text='{"answer": "no"}', logprobs=(SURE_AND_WRONG,))
    store = project.store()
    with store.engine.begin() as connection:  # the labels' table is gone: every read fails
        connection.exec_driver_sql("DROP TABLE feedback")
    store.engine.dispose()
    result = project.run("sure", {"text": "c1"})
    assert result.status == "succeeded"
    [call] = project.calls(result.run_id)
    assert (call["outcome"], call["raw_confidence"]) == ("ok", None)
    assert call["confidence"] == pytest.approx(0.9406, abs=1e-3)
    assert "calibration labels unreadable, scores stay raw" in caplog.text
    # The step is tier: auto; the router could not read its labels either, and
    # started it at the cheapest tier instead of failing it.
    assert (call["tier_used"], call["routed"], call["expected_pass"]) == ("light", "auto", None)
    assert "its history is unreadable, it starts at the cheapest tier" in caplog.text
