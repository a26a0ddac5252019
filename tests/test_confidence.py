"""Confidence signals: an answer below its step's minimum escalates as low_confidence.

Loopback Ollama and OpenAI servers give log-probabilities as the real servers
do when a request asks for them; the real ollama and litellm clients read them.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator.confidence import logprob_score
from orchestrator.models.base import TokenChoice
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

UNSURE = Reply(text="billing", logprobs=(-2.0,))  # p 0.135, its alternative 0.0067
SURE = Reply(text="bug", logprobs=(-0.01,))


def confident_step(project: Project, *, minimum: float = 0.5, **step: Any) -> None:
    project.workflow(
        {
            "name": "one",
            "steps": [
                {
                    "id": "only",
                    "agent": "helper",
                    "tier": "light",
                    "confidence": {"signal": "logprob", "min": minimum},
                    **step,
                }
            ],
        }
    )


def rows(project: Project, run_id: str) -> list[tuple[str, str, str | None, float | None]]:
    return [
        (c["tier_used"], c["outcome"], c["signal"], c["confidence"]) for c in project.calls(run_id)
    ]


def test_a_short_answer_scores_its_first_token_margin() -> None:
    score = logprob_score([TokenChoice(math.log(0.7), math.log(0.2))])
    assert score == pytest.approx(0.5)
    # Chosen below its best alternative (sampled at a temperature): no margin.
    assert logprob_score([TokenChoice(math.log(0.3), math.log(0.6))]) == 0.0
    assert logprob_score([TokenChoice(math.log(0.8))]) == pytest.approx(0.8)
    assert logprob_score([]) is None and logprob_score(None) is None


def test_a_long_answer_is_held_down_by_its_least_sure_token() -> None:
    sure = [TokenChoice(math.log(0.99))] * 9
    assert logprob_score(sure) == pytest.approx(0.99)
    one_doubt = logprob_score([*sure, TokenChoice(math.log(0.05))])
    mean_alone = math.exp((9 * math.log(0.99) + math.log(0.05)) / 10)
    assert one_doubt is not None and one_doubt < mean_alone
    assert one_doubt == pytest.approx(math.sqrt(mean_alone * 0.05))


def test_an_unsure_local_answer_escalates_and_the_sure_one_is_kept(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    confident_step(project)
    ollama.reply(UNSURE)
    frontier.reply(SURE)
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == "bug"
    found = rows(project, result.run_id)
    assert [(tier, outcome, signal) for tier, outcome, signal, _ in found] == [
        ("light", "low_confidence", "logprob"),
        ("frontier", "ok", "logprob"),
    ]
    assert found[0][3] == pytest.approx(math.exp(-2) - math.exp(-5), abs=1e-6)
    assert found[1][3] == pytest.approx(math.exp(-0.01) - math.exp(-3.01), abs=1e-6)
    calls = project.calls(result.run_id)
    assert "below min 0.5" in calls[0]["error"]
    assert calls[1]["escalation_reason"].startswith("light/ollama/llama3.2:1b: low_confidence")
    # Both clients asked for the token log-probabilities and one alternative each.
    (asked_ollama,) = ollama.chat_requests()
    assert asked_ollama["logprobs"] is True and asked_ollama["top_logprobs"] == 2
    (asked_frontier,) = frontier.chat_requests()
    assert asked_frontier["logprobs"] is True and asked_frontier["top_logprobs"] == 2


def test_a_sure_local_answer_never_reaches_the_frontier(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    confident_step(project)
    ollama.reply(SURE)
    result = project.run("one")
    assert result.outputs["only"] == "bug"
    assert [outcome for _, outcome, _, _ in rows(project, result.run_id)] == ["ok"]
    assert frontier.chat_requests() == []


def test_with_nothing_surer_above_the_step_takes_its_last_answer(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    confident_step(project)
    ollama.reply(UNSURE)
    frontier.reply(Reply(text="refund", logprobs=(-1.0,)))
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == "refund"
    assert [outcome for _, outcome, _, _ in rows(project, result.run_id)] == [
        "low_confidence",
        "low_confidence",
    ]
    shown = tierflow("show", result.run_id, cwd=project.root)
    assert shown.returncode == 0, shown.stderr
    assert "confidence (logprob): 0.350, raw (not calibrated:" in shown.stdout
    step = project.steps(result.run_id)[0]
    assert (step["tier_used"], step["model"]) == ("frontier", "openai/gpt-4o-mini")


def test_a_backend_that_gives_no_logprobs_is_recorded_as_unscored(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    confident_step(project)
    ollama.reply(Reply(text="bug", logprobs=()))
    result = project.run("one")
    assert result.outputs["only"] == "bug"
    assert rows(project, result.run_id) == [("light", "ok", "logprob", None)]
    assert frontier.chat_requests() == []
    shown = tierflow("show", result.run_id, cwd=project.root)
    assert "confidence (logprob): unavailable, the backend gave nothing to score" in shown.stdout


def test_streamed_answers_carry_their_logprobs(
    tmp_path: Any, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    tiers = tiers_for(ollama, frontier)
    for tier in tiers.values():
        tier["models"][0]["stream"] = True
    project = Project(tmp_path / "p", {"tiers": tiers})
    confident_step(project, minimum=0.9)
    # One unsure word of four: mean log p -0.5075, least -2.0.
    ollama.reply(Reply(text="one two three four", logprobs=(-0.01, -0.01, -0.01, -2.0)))
    frontier.reply(Reply(text="one two three four", logprobs=(-0.01,)))
    result = project.run("one")
    found = rows(project, result.run_id)
    assert [outcome for _, outcome, _, _ in found] == ["low_confidence", "ok"]
    assert found[0][3] == pytest.approx(math.exp((-0.5075 - 2.0) / 2), abs=1e-6)
    assert found[1][3] == pytest.approx(math.exp(-0.01), abs=1e-6)
    assert all(request.get("stream") for request in ollama.chat_requests())
    assert all(request.get("stream") for request in frontier.chat_requests())


def test_without_low_confidence_in_escalation_on_the_score_is_only_recorded(
    tmp_path: Any, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(
        tmp_path / "p",
        {"tiers": tiers_for(ollama, frontier), "escalation": {"on": ["error", "invalid_output"]}},
    )
    confident_step(project)
    ollama.reply(UNSURE)
    result = project.run("one")
    assert result.status == "succeeded" and result.outputs["only"] == "billing"
    assert [outcome for _, outcome, _, _ in rows(project, result.run_id)] == ["low_confidence"]
    assert frontier.chat_requests() == []


def test_a_step_confidence_overrides_its_agents(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.agent(
        "helper", prompt="{{ inputs.text }}", confidence={"signal": "logprob", "min": 0.95}
    )
    project.workflow({"name": "one", "steps": [{"id": "only", "agent": "helper", "tier": "light"}]})
    ollama.reply(SURE)  # margin 0.94: below the agent's 0.95
    frontier.reply(Reply(text="a longer sure answer", logprobs=(-0.01,)))  # 0.99
    result = project.run("one")
    assert [outcome for _, outcome, _, _ in rows(project, result.run_id)] == [
        "low_confidence",
        "ok",
    ]
    confident_step(project, minimum=0.9)
    ollama.reply(SURE)
    again = project.run("one")
    assert [outcome for _, outcome, _, _ in rows(project, again.run_id)] == ["ok"]


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [
        ({"signal": "logprob", "min": 1.5}, "min: Input should be less than or equal to 1"),
        (
            {"signal": "logprobs", "min": 0.5},
            "signal: Input should be 'logprob', 'consistency' or 'judge' (did you mean 'logprob'?)",
        ),
        ({"signal": "logprob"}, "min: Field required"),
    ],
)
def test_a_bad_confidence_is_refused_at_load(
    project: Project, confidence: dict[str, Any], expected: str
) -> None:
    project.workflow(
        {
            "name": "one",
            "steps": [{"id": "only", "agent": "helper", "confidence": confidence}],
        }
    )
    checked = tierflow("validate", "workflows/one.yaml", cwd=project.root)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    out = checked.stdout + checked.stderr
    assert "workflows/one.yaml:" in out and expected in out
    assert "Traceback" not in out


def consistent_step(project: Project, *, minimum: float, samples: int = 3, **step: Any) -> None:
    project.workflow(
        {
            "name": "one",
            "steps": [
                {
                    "id": "only",
                    "agent": "helper",
                    "tier": "light",
                    "confidence": {"signal": "consistency", "min": minimum, "samples": samples},
                    **step,
                }
            ],
        }
    )


def test_samples_that_disagree_escalate_and_each_is_a_ledger_row(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    consistent_step(project, minimum=0.8)
    ollama.reply("Billing.", "bug", "billing")
    frontier.reply("bug", "Bug", "bug ")
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == "bug"
    found = rows(project, result.run_id)
    assert [(tier, outcome) for tier, outcome, _, _ in found] == [
        ("light", "ok"),
        ("light", "ok"),
        ("light", "low_confidence"),
        ("frontier", "ok"),
        ("frontier", "ok"),
        ("frontier", "ok"),
    ]
    assert {signal for _, _, signal, _ in found} == {"consistency"}
    assert [score for _, _, _, score in found] == pytest.approx([2 / 3] * 3 + [1.0] * 3)
    calls = project.calls(result.run_id)
    assert "2 of 3 samples agree" in calls[2]["error"]
    # Samples are drawn at a temperature, whatever the agent's own.
    assert {r["options"]["temperature"] for r in ollama.chat_requests()} == {0.7}
    assert {r["temperature"] for r in frontier.chat_requests()} == {0.7}


def test_agreeing_samples_keep_the_answer_local(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    consistent_step(project, minimum=0.6, output={"type": "object"})
    ollama.reply('{"a": 1, "b": 2}', '{"b": 2, "a": 1}', '{"a": 3}')
    result = project.run("one")
    assert result.outputs["only"] == {"a": 1, "b": 2}
    assert [outcome for _, outcome, _, _ in rows(project, result.run_id)] == ["ok"] * 3
    assert frontier.chat_requests() == []


def test_a_sample_that_fails_counts_as_disagreeing(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    consistent_step(project, minimum=0.9, samples=2, output={"type": "object"})
    ollama.reply('{"a": 1}', "not json")
    frontier.reply('{"a": 2}', '{"a": 2}')
    result = project.run("one")
    assert result.outputs["only"] == {"a": 2}
    found = rows(project, result.run_id)
    assert [(tier, outcome) for tier, outcome, _, _ in found] == [
        ("light", "low_confidence"),
        ("light", "invalid_output"),
        ("frontier", "ok"),
        ("frontier", "ok"),
    ]
    assert found[0][3] == pytest.approx(0.5)


def judged_step(project: Project, *, tier: str = "light", **step: Any) -> None:
    project.agent("grader", system="You grade answers.", max_tokens=32)
    project.workflow(
        {
            "name": "one",
            "inputs": {"text": {"type": "string", "default": "my card was charged twice"}},
            "steps": [
                {
                    "id": "only",
                    "agent": "helper",
                    "tier": "light",
                    "confidence": {"signal": "judge", "min": 0.7, "agent": "grader", "tier": tier},
                    **step,
                }
            ],
        }
    )


def grading(answers: dict[str, float], answer: str) -> Any:
    """A responder: the judge's grade when asked to judge, else ``answer``."""

    def respond(body: dict[str, Any]) -> Reply:
        asked = body["messages"][-1]["content"]
        if "How likely is this answer" in asked:
            graded = asked.split("Answer:\n", 1)[1].split("\n", 1)[0]
            return Reply(text=f'{{"score": {answers[graded]}}}')
        return Reply(text=answer)

    return respond


def test_a_judge_that_doubts_the_local_answer_sends_the_step_up(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    judged_step(project)
    ollama.responder = grading({"refund": 0.2, "billing": 0.9}, "refund")
    frontier.reply("billing")
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == "billing"
    calls = project.calls(result.run_id)
    assert [
        (c["tier_used"], c["agent"], c["outcome"], c["signal"], c["confidence"], c["judged"])
        for c in calls
    ] == [
        ("light", "helper", "low_confidence", "judge", 0.2, None),
        ("light", "grader", "ok", None, None, 1),
        ("frontier", "helper", "ok", "judge", 0.9, None),
        ("light", "grader", "ok", None, None, 3),
    ]
    assert "judge grader scored 0.200, below min 0.7" in calls[0]["error"]
    # The judge saw the question as sent and the answer, under its own system prompt.
    judge_request = ollama.chat_requests()[1]
    assert judge_request["messages"][0] == {"role": "system", "content": "You grade answers."}
    assert "my card was charged twice" in judge_request["messages"][-1]["content"]
    assert "Answer:\nrefund" in judge_request["messages"][-1]["content"]
    assert judge_request["format"]["required"] == ["score"]
    step = project.steps(result.run_id)[0]
    assert (step["tier_used"], step["model"]) == ("frontier", "openai/gpt-4o-mini")


def test_a_judge_that_gives_no_grade_leaves_the_answer_unscored(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    judged_step(project)
    ollama.reply("refund", "I cannot grade this")
    result = project.run("one")
    assert result.outputs["only"] == "refund"
    calls = project.calls(result.run_id)
    assert [(c["outcome"], c["signal"], c["confidence"]) for c in calls] == [
        ("ok", "judge", None),
        ("invalid_output", None, None),
    ]
    assert frontier.chat_requests() == []


def test_a_confidential_step_may_not_have_a_hosted_judge(project: Project) -> None:
    judged_step(project, tier="frontier")
    path = project.root / "workflows" / "one.yaml"
    path.write_text(
        path.read_text().replace("type: string", "type: string\n    confidential: true")
    )
    checked = tierflow("validate", "workflows/one.yaml", cwd=project.root)
    assert checked.returncode == 2, checked.stdout
    assert (
        "step 'only' reads confidential input 'text' (in its agent's prompt), so its judge may use"
        " only tiers marked local: true, and judge tier 'frontier' is not"
    ) in checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [
        (
            {"signal": "judge", "min": 0.5, "agent": "gradr", "tier": "light"},
            "unknown agent 'gradr' (did you mean 'grader'?)",
        ),
        (
            {"signal": "judge", "min": 0.5, "agent": "grader", "tier": "lite"},
            "unknown judge tier 'lite' (did you mean 'light'?)",
        ),
        ({"signal": "judge", "min": 0.5}, "signal judge needs agent:"),
        (
            {"signal": "logprob", "min": 0.5, "tier": "light"},
            "agent: and tier: are for signal judge",
        ),
    ],
)
def test_a_bad_judge_is_refused_at_load(
    project: Project, confidence: dict[str, Any], expected: str
) -> None:
    project.agent("grader", max_tokens=32)
    project.workflow(
        {"name": "one", "steps": [{"id": "only", "agent": "helper", "confidence": confidence}]}
    )
    checked = tierflow("validate", "workflows/one.yaml", cwd=project.root)
    assert checked.returncode == 2
    out = checked.stdout + checked.stderr
    assert "workflows/one.yaml:" in out and expected in out, out


def test_a_json_answer_is_scored_on_its_values_not_its_scaffolding() -> None:
    from orchestrator.confidence import value_tokens

    pieces = [('{"', -3.0), ("answer", -2.0), ('":', -1.0), (' "', -1.5), ("4", -0.1), ("2", -0.2), ('"}', -4.0)]  # fmt: skip
    tokens = [TokenChoice(logprob, math.log(0.01), text) for text, logprob in pieces]
    assert [t.text for t in value_tokens(tokens)] == ["4", "2"]
    # Two value tokens: the margin of the first, p("4") - p(best other).
    scored = logprob_score(tokens, structured=True)
    assert scored == pytest.approx(math.exp(-0.1) - 0.01)
    assert logprob_score(tokens) is not None and logprob_score(tokens) < 0.2  # all seven
    # Keys, escaped quotes and literals: only values are marked.
    text = '{"a": "x\\"y", "b": [1, true], "c": null}'
    tokens = [TokenChoice(-1.0, None, char) for char in text]
    assert "".join(t.text for t in value_tokens(tokens)) == 'x\\"y1truenull'
    # Tokens with no text (a backend that gives none) all count.
    bare = [TokenChoice(-0.5), TokenChoice(-0.5)]
    assert value_tokens(bare) == bare
