"""cache: on a step: a repeated request is answered from the database, costs
nothing, and still counts what the all-frontier counterfactual would have paid."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

from conftest import Project, tierflow
from sqlalchemy import text

from orchestrator import reports
from orchestrator.settings import load_settings
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def asked(server: OllamaServer | OpenAIServer) -> int:
    """Chat requests the server received (the ollama client also lists models)."""
    return sum(1 for body in server.requests if body.get("_path") != "/api/tags")


def cached_step(project: Project, **step: Any) -> None:
    project.workflow(
        {
            "name": "kept",
            "inputs": {"text": {"type": "string", "default": "hello"}},
            "steps": [
                {"id": "only", "agent": "helper", "tier": "light", "cache": True, **step},
            ],
        }
    )


def test_a_repeated_request_is_answered_from_the_cache(
    project: Project, ollama: OllamaServer
) -> None:
    cached_step(project)
    ollama.reply(Reply(text="kept answer", prompt_tokens=40, completion_tokens=7))
    first = project.run("kept")
    second = project.run("kept")
    assert first.outputs == second.outputs == {"only": "kept answer"}
    assert asked(ollama) == 1

    (hit,) = project.calls(second.run_id)
    assert hit["outcome"] == "cache_hit"
    assert (hit["prompt_tokens"], hit["completion_tokens"], hit["cost_usd"]) == (0, 0, 0)
    assert hit["usage_source"] is None
    # What the reference model would have charged for the answer's tokens.
    reference = load_settings(project.config).reference_price()
    assert reference is not None
    assert hit["reference_cost_usd"] == reference.cost(40, 7) > 0
    assert project.steps(second.run_id)[0]["tier_used"] == "light"

    # Spend counts one request, and the hit's counterfactual among the savings.
    store = project.store()
    try:
        found = reports.report(store.engine, by="workflow")
    finally:
        store.engine.dispose()
    assert found.total.calls == 1
    assert found.total.reference_cost_usd == 2 * reference.cost(40, 7)
    assert found.total.savings_usd == 2 * reference.cost(40, 7)


def test_an_escalated_answer_is_reused_without_asking_the_cheap_tier_again(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    cached_step(project, checks=["output | wordcount <= 2"])
    ollama.reply("far too many words here")
    frontier.reply("two words")
    first = project.run("kept")
    assert [c["outcome"] for c in project.calls(first.run_id)] == ["invalid_output", "ok"]

    second = project.run("kept")
    assert second.outputs == {"only": "two words"}
    assert (asked(ollama), asked(frontier)) == (1, 1)
    (hit,) = project.calls(second.run_id)
    assert (hit["tier_used"], hit["model"], hit["outcome"]) == (
        "frontier",
        "openai/gpt-4o-mini",
        "cache_hit",
    )
    assert hit["escalation_reason"] is None


def test_another_prompt_is_another_request(project: Project, ollama: OllamaServer) -> None:
    cached_step(project)
    ollama.responder = lambda body: Reply(text=f"about {body['messages'][-1]['content']}")
    assert project.run("kept", {"text": "a"}).outputs == {"only": "about a"}
    assert project.run("kept", {"text": "b"}).outputs == {"only": "about b"}
    assert project.run("kept", {"text": "a"}).outputs == {"only": "about a"}
    assert asked(ollama) == 2


def test_a_kept_answer_that_fails_the_checks_now_is_asked_again(
    project: Project, ollama: OllamaServer
) -> None:
    cached_step(project)
    ollama.reply("one two three")
    project.run("kept")
    cached_step(project, checks=["output | wordcount <= 2"])
    ollama.reply("one two")
    result = project.run("kept")
    assert result.outputs == {"only": "one two"}
    assert [c["outcome"] for c in project.calls(result.run_id)] == ["ok"]
    assert asked(ollama) == 2


def test_a_kept_answer_expires_after_its_ttl(project: Project, ollama: OllamaServer) -> None:
    cached_step(project, cache={"ttl_s": 1})
    ollama.reply("first")
    project.run("kept")
    time.sleep(1.2)
    ollama.reply("second")
    assert project.run("kept").outputs == {"only": "second"}
    assert asked(ollama) == 2


def test_cache_false_on_a_step_turns_its_agents_cache_off(
    project: Project, ollama: OllamaServer
) -> None:
    project.agent("helper", system="You help.", prompt="{{ inputs.text }}", cache=True)
    cached_step(project, cache=False)
    ollama.reply("a")
    ollama.reply("b")
    project.run("kept")
    assert project.run("kept").outputs == {"only": "b"}


def test_sensitive_steps_and_personal_data_are_not_kept_unless_the_step_says_so(
    project: Project, ollama: OllamaServer
) -> None:
    ollama.responder = lambda body: Reply(text="fine")
    cached_step(project, sensitive=True)
    project.run("kept")
    project.run("kept")
    assert asked(ollama) == 2

    cached_step(project)
    project.run("kept", {"text": "mail ana@example.com"})
    project.run("kept", {"text": "mail ana@example.com"})
    assert asked(ollama) == 4

    cached_step(project, sensitive=True, cache={"sensitive": True})
    project.run("kept")
    project.run("kept")
    assert asked(ollama) == 5
    store = project.store()
    try:
        with store.engine.connect() as connection:
            kept = connection.execute(text("SELECT step_id, answer FROM answer_cache")).all()
    finally:
        store.engine.dispose()
    assert kept == [("only", "fine")]


def test_a_schema_steps_kept_value_comes_back_parsed(
    project: Project, ollama: OllamaServer
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cached_step(project, output=schema)
    ollama.reply('{"n": 3}')
    project.run("kept")
    assert project.run("kept").outputs == {"only": {"n": 3}}
    assert asked(ollama) == 1


def test_an_unreadable_cache_is_a_miss_and_the_step_goes_on(
    project: Project, ollama: OllamaServer
) -> None:
    cached_step(project)
    ollama.reply("first")
    project.run("kept")
    store = project.store()
    try:
        with store.engine.begin() as connection:
            connection.execute(text("DROP TABLE answer_cache"))
    finally:
        store.engine.dispose()
    ollama.reply("second")
    result = project.run("kept")
    assert result.status == "succeeded"
    assert result.outputs == {"only": "second"}


def test_cache_clear_drops_kept_answers(project: Project, ollama: OllamaServer) -> None:
    cached_step(project)
    ollama.responder = lambda body: Reply(text="fine")
    project.run("kept")
    other = tierflow("cache", "clear", "--workflow", "other", cwd=project.root)
    assert other.stdout.strip() == "dropped 0 kept answers of workflow other"
    cleared = tierflow("cache", "clear", "--workflow", "kept", cwd=project.root)
    assert cleared.returncode == 0
    assert cleared.stdout.strip() == "dropped 1 kept answer of workflow kept"
    project.run("kept")
    assert asked(ollama) == 2


def test_cache_with_a_consistency_signal_is_refused_at_load(project: Project) -> None:
    path = project.workflow(
        {
            "name": "bad",
            "steps": [
                {
                    "id": "only",
                    "agent": "helper",
                    "tier": "light",
                    "confidence": {"signal": "consistency", "min": 0.5},
                    "cache": True,
                }
            ],
        }
    )
    proc = tierflow("validate", str(path), cwd=project.root)
    assert proc.returncode == 2
    said = proc.stdout + proc.stderr
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "cache:" in t)
    assert f"bad.yaml:{line}:" in said and "consistency" in said
    assert "Traceback" not in said


def test_show_and_spend_json_tell_a_hit_apart(project: Project, ollama: OllamaServer) -> None:
    cached_step(project)
    ollama.reply("kept answer")
    project.run("kept")
    second = project.run("kept")
    shown = tierflow("show", second.run_id, cwd=project.root).stdout
    assert "cache_hit" in shown
    found = json.loads(tierflow("spend", "--json", cwd=project.root).stdout)
    assert found["total"]["calls"] == 1
    assert Decimal(found["total"]["cost_usd"]) == 0


def test_an_answer_holding_personal_data_is_not_kept(
    project: Project, ollama: OllamaServer
) -> None:
    cached_step(project)
    ollama.reply("write to ana@example.com", "write to ana@example.com")
    project.run("kept")
    project.run("kept")
    assert asked(ollama) == 2


def test_a_step_that_now_asks_for_confidence_takes_no_answer_kept_without_it(
    project: Project, ollama: OllamaServer
) -> None:
    cached_step(project)
    ollama.reply("plain")
    project.run("kept")
    cached_step(project, confidence={"signal": "logprob", "min": 0.1})
    ollama.reply("scored")
    assert project.run("kept").outputs == {"only": "scored"}
