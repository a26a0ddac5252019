"""``tierflow eval``: labelled cases under tiering policies, through the real clients."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for
from sqlalchemy import func, select

from orchestrator import evaluation
from orchestrator.store.tables import feedback, model_calls, runs
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

SCHEMA = {
    "type": "object",
    "required": ["answer"],
    "properties": {"answer": {"enum": ["yes", "no"]}},
}
# The local model: right on c0-c5 (sure of itself), wrong on c6-c7 (unsure),
# and outside the schema on c8-c9. The frontier is always right.
RIGHT = {f"c{i}": "yes" if i % 2 == 0 else "no" for i in range(10)}


def light(body: dict[str, Any]) -> Reply:
    case = body["messages"][-1]["content"].strip()
    index = int(case[1:])
    if index >= 8:
        return Reply(text='{"answer": "maybe"}', prompt_tokens=1000, completion_tokens=0)
    wrong = {"yes": "no", "no": "yes"}[RIGHT[case]]
    answer, logprob = (RIGHT[case], -0.01) if index < 6 else (wrong, -2.0)
    return Reply(
        text=json.dumps({"answer": answer}),
        prompt_tokens=1000,
        completion_tokens=0,
        logprobs=(logprob,),
    )


def strong(body: dict[str, Any]) -> Reply:
    case = body["messages"][-1]["content"].strip()
    return Reply(text=json.dumps({"answer": RIGHT[case]}), prompt_tokens=1000, completion_tokens=0)


def eval_project(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    project = Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier),
            # $0.01 a call on the frontier and on the reference model; light is local, $0.
            "prices": {
                "openai/gpt-4o-mini": {"input": 10, "output": 0},
                "openai/gpt-4.1": {"input": 10, "output": 0},
            },
            "router": {"explore": 0.0},
        },
    )
    project.workflow(
        {
            "name": "classify",
            "steps": [
                {
                    "id": "sort",
                    "agent": "helper",
                    "tier": "light",
                    "output": SCHEMA,
                    "confidence": {"signal": "logprob", "min": 0.0},
                }
            ],
        }
    )
    cases = [
        {"inputs": {"text": case}, "expect": {"sort": {"answer": a}}} for case, a in RIGHT.items()
    ]
    project.write("cases.jsonl", "\n".join(json.dumps(case) for case in cases) + "\n")
    ollama.responder, frontier.responder = light, strong
    return project


def run_eval(project: Project, *args: str) -> dict[str, Any]:
    done = tierflow("eval", "classify", "--cases", "cases.jsonl", *args, "--json", cwd=project.root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_policies_report_quality_cost_escalations_and_the_signal(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = eval_project(tmp_path, ollama, frontier)
    found = run_eval(
        project, "--policy", "tier:light", "--policy", "tier:frontier", "--policy", "as-written"
    )
    assert found["workflow"] == "classify" and found["cases"] == 10
    cheap, strongest, written = found["policies"]
    assert [p["policy"] for p in found["policies"]] == ["tier:light", "tier:frontier", "as-written"]

    # All local: six right, two wrong answers taken, two outside the schema and not retried.
    assert (cheap["quality"], cheap["right"]) == (0.6, 6)
    assert cheap["quality_ci"] == [0.3127, 0.8318]  # Wilson, 95%
    assert cheap["calls_by_tier"] == {"light": 10}
    assert cheap["false_accepts"] == {"light": 2}
    assert (cheap["wasted_calls"], cheap["wasted_by_tier"]) == (2, {"light": 2})
    assert (cheap["cost_usd"], cheap["escalations_per_case"]) == ("0", 0.0)
    # Eight answered runs would have cost $0.01 each on the reference; the two failed claim none.
    assert (cheap["reference_cost_usd"], cheap["savings_usd"]) == ("0.08", "0.08")

    # All frontier: every case right, one $0.01 call each.
    assert (strongest["quality"], strongest["calls_by_tier"]) == (1.0, {"frontier": 10})
    assert (strongest["cost_usd"], strongest["cost_share"], strongest["savings_usd"]) == (
        "0.1",
        1.0,
        "0",
    )
    assert strongest["false_accepts"] == {} and strongest["wasted_calls"] == 0

    # As written: the two invalid answers escalate and come back right.
    assert written["quality"] == 0.8
    assert written["calls_by_tier"] == {"light": 10, "frontier": 2}
    assert written["escalations_per_case"] == 0.2
    assert (written["cost_usd"], written["cost_per_case_usd"]) == ("0.02", "0.002")
    assert (written["cost_share"], written["savings_usd"]) == (0.2, "0.08")
    assert written["false_accepts"] == {"light": 2} and written["wasted_calls"] == 2

    # The gap between all-local (0.6) and all-frontier (1.0): as written closes half of it.
    assert found["pgr"] == {"tier:light": 0.0, "tier:frontier": 1.0, "as-written": 0.5}
    assert written["pgr"] == 0.5
    # Logprobs told the six right answers from the two wrong ones perfectly.
    assert found["signals"] == {
        "logprob": {"auroc": 1.0, "tier": "light", "answers": 8, "right": 6}
    }
    latencies = [p["latency_ms_p50"] for p in found["policies"]]
    assert all(p50 > 0 for p50 in latencies)
    assert all(p["latency_ms_p95"] >= p["latency_ms_p50"] for p in found["policies"])

    # Every checked answer became a label the router counts: 8 + 10 + 10 answered steps.
    store = project.store()
    with store.engine.connect() as connection:
        labels = connection.execute(
            select(feedback.c.good, func.count()).group_by(feedback.c.good)
        ).all()
        marked = connection.execute(select(func.count()).where(runs.c.eval.is_(True))).scalar()
    store.engine.dispose()
    assert dict(labels) == {True: 24, False: 4}
    assert marked == 30

    # The table says the same.
    table = tierflow(
        "eval", "classify", "--cases", "cases.jsonl", "-p", "as-written", "--limit", "4",
        cwd=project.root,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "as-written" in table.stdout and "4 cases" in table.stdout
    assert "signal logprob: AUROC n/a" in table.stdout and "--policy tier:light" in table.stdout


def test_eval_runs_stay_out_of_spend_unless_asked(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = eval_project(tmp_path, ollama, frontier)
    run_eval(project, "--policy", "tier:frontier", "--limit", "3")
    assert project.run("classify", {"text": "c1"}).status == "succeeded"

    def spend(*args: str) -> dict[str, Any]:
        done = tierflow("spend", "--json", *args, cwd=project.root)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["total"]

    assert (spend()["calls"], spend()["cost_usd"]) == (1, "0")  # the run alone, on light
    everything = spend("--include-eval")
    assert (everything["calls"], everything["cost_usd"]) == (4, "0.03")
    store = project.store()
    with store.engine.connect() as connection:
        marks = connection.execute(
            select(model_calls.c.eval, func.count()).group_by(model_calls.c.eval)
        ).all()
    store.engine.dispose()
    assert sorted(marks, key=str) == sorted([(None, 1), (True, 3)], key=str)
    listed = tierflow("runs", cwd=project.root).stdout
    assert listed.count("classify (eval)") == 3 and listed.count("classify ") == 4


def test_auto_learns_from_the_cases_to_skip_a_tier_that_keeps_failing(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = eval_project(tmp_path, ollama, frontier)
    # The local model now costs a third of the frontier per call and is never valid.
    config = project.config.read_text()
    project.config.write_text(
        config.replace("prices:", "prices:\n  ollama/llama3.2:1b: {input: 3.3, output: 0}")
    )
    ollama.responder = lambda body: Reply(
        text='{"answer": "maybe"}', prompt_tokens=1000, completion_tokens=0
    )
    found = run_eval(project, "--policy", "as-written", "--policy", "auto")
    written, auto = found["policies"]
    assert written["quality"] == auto["quality"] == 1.0
    assert written["wasted_by_tier"] == {"light": 10}
    # The router starts cold (prior 0.5 > 0.33), tries light twice, then starts at the frontier.
    assert auto["wasted_by_tier"] == {"light": 2}
    assert auto["calls_by_tier"] == {"light": 2, "frontier": 10}
    assert Decimal(auto["cost_usd"]) < Decimal(written["cost_usd"])
    # Its history is its own: what it learnt is not what an ordinary tier: auto run reads.
    workflow = project.root / "workflows" / "classify.yaml"
    workflow.write_text(workflow.read_text().replace("tier: light", "tier: auto"))
    again = run_eval(project, "--policy", "auto", "--limit", "4")["policies"][0]
    assert again["calls_by_tier"] == {"light": 2, "frontier": 4}  # it learnt from cold again
    result = project.run("classify", {"text": "c0"})
    assert [c["tier_used"] for c in project.calls(result.run_id)] == ["light", "frontier"]


def test_matching_rules() -> None:
    assert evaluation.matches("positive", " positive\n")
    assert not evaluation.matches("positive", "Positive")
    assert evaluation.matches({"contains": "pos"}, "it is positive")
    assert evaluation.matches({"contains": "yes"}, {"answer": "yes"})  # JSON text of the output
    assert evaluation.matches({"one_of": ["a", "b"]}, "b ")
    assert not evaluation.matches({"one_of": ["a", "b"]}, "c")
    assert evaluation.matches({"answer": 3}, {"answer": 3.0})
    assert not evaluation.matches(1, True)
    assert evaluation.matches([1, 2], [1, 2]) and not evaluation.matches([1, 2], [2, 1])


def test_wilson_auroc_and_percentiles() -> None:
    assert evaluation.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluation.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert evaluation.wilson(0, 0) == (0.0, 1.0)
    assert evaluation.auroc([(0.9, True), (0.1, False)]) == 1.0
    assert evaluation.auroc([(0.1, True), (0.9, False)]) == 0.0
    assert evaluation.auroc([(0.5, True), (0.5, False), (0.7, True)]) == 0.75
    assert evaluation.auroc([(0.5, True)]) is None
    assert evaluation.percentile([5, 1, 3, 2, 4], 0.5) == 3
    assert evaluation.percentile([float(n) for n in range(1, 101)], 0.95) == 95.0


@pytest.mark.parametrize(
    ("lines", "args", "message"),
    [
        (['{"inputs": {"text": "c0"}, "expect": {"sort": "x"}}', "{not json"], (), "cases.jsonl:2: not JSON"),
        (['{"inputs": {}, "expect": {"srot": "x"}}'], (), "cases.jsonl:1: expect: the workflow has no step 'srot' (did you mean 'sort'?)"),
        (['{"input": {}, "expect": {"sort": "x"}}'], (), "cases.jsonl:1: unknown key 'input' (did you mean 'inputs'?)"),
        (['{"inputs": {"text": 3}, "expect": {"sort": "x"}}'], (), "cases.jsonl:1: "),
        (['{"inputs": {}, "expect": {}}'], (), "cases.jsonl:1: expect must map step ids"),
        (['{"expect": {"sort": {"one_of": "x"}}}'], (), "expect.sort: one_of takes a list"),
        ([""], (), "cases.jsonl: no cases"),
        (['{"expect": {"sort": "x"}}'], ("--policy", "tier:ligth"), "(did you mean 'tier:light'?)"),
        (['{"expect": {"sort": "x"}}'], ("--policy", "cheap"), "choose as-written, auto or tier:NAME"),
        (['{"expect": {"sort": "x"}}'], ("--limit", "0"), "--limit 0"),
    ],
)  # fmt: skip
def test_bad_cases_and_policies_are_refused_before_anything_runs(
    tmp_path: Path,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    lines: list[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    project = eval_project(tmp_path, ollama, frontier)
    project.write("cases.jsonl", "\n".join(lines) + "\n")
    done = tierflow("eval", "classify", "--cases", "cases.jsonl", *args, cwd=project.root)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert ollama.chat_requests() == [] and frontier.chat_requests() == []


EVALS = Path(__file__).resolve().parent.parent / "evals"


def test_the_shipped_cases_fit_the_shipped_workflows() -> None:
    from orchestrator.settings import load_settings
    from orchestrator.spec import find_workflow, load_workflow

    settings = load_settings(EVALS / "tierflow.yaml")
    for name in ("tasks", "tasks-consistency", "tasks-judge"):
        loaded = load_workflow(find_workflow(name, settings), settings)
        for name in ("cases.jsonl", "calibration.jsonl"):
            assert len(evaluation.load_cases(EVALS / name, loaded)) == 240
    lines = (EVALS / "cases.jsonl").read_text().splitlines()
    kinds = {json.loads(line)["meta"]["dataset"] for line in lines}
    assert len(kinds) == 8
    assert [t.simulated for t in settings.config.tiers.values()] == [False, True, True]


def test_the_shipped_eval_runs_on_the_real_small_model(tmp_path: Path) -> None:
    """Two cases through SmolLM2 and the simulated tiers, as bench/eval.py runs them."""
    import shutil

    from orchestrator.testing import GoldAnswers

    cases = [json.loads(line) for line in (EVALS / "cases.jsonl").read_text().splitlines()]
    answers = {c["inputs"]["question"]: c["expect"]["answer"]["answer"] for c in cases}
    with OpenAIServer() as standard, OpenAIServer() as strongest:
        standard.responder = GoldAnswers(answers, error_rate=1.0, seed="standard")
        strongest.responder = GoldAnswers(answers, error_rate=0.0, seed="frontier")
        root = tmp_path / "evals"
        shutil.copytree(EVALS, root, ignore=shutil.ignore_patterns("*.db", "generate.py"))
        config = (root / "tierflow.yaml").read_text()
        config = config.replace("http://127.0.0.1:8781", standard.url)
        config = config.replace("http://127.0.0.1:8782", strongest.url)
        (root / "tierflow.yaml").write_text(config)
        done = tierflow(
            "eval", "tasks", "--cases", "cases.jsonl", "--limit", "2",
            "-p", "tier:light", "-p", "tier:standard", "-p", "tier:frontier", "--json",
            cwd=root,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        by_policy = {p["policy"]: p for p in found["policies"]}
        assert by_policy["tier:light"]["calls_by_tier"] == {"light": 2}
        # Simulated: the standard tier is told to be always wrong, the frontier never.
        assert by_policy["tier:standard"]["quality"] == 0.0
        assert by_policy["tier:frontier"]["quality"] == 1.0
        assert Decimal(by_policy["tier:frontier"]["cost_usd"]) > 0
        assert found["signals"]["logprob"]["answers"] == 2
        table = tierflow(
            "eval", "tasks", "--cases", "cases.jsonl", "--limit", "1", "-p", "tier:frontier",
            cwd=root,
        )  # fmt: skip
        assert "tier:frontier (simulated)" in table.stdout
        assert "simulated: tier standard, frontier is served by a stand-in" in table.stdout
