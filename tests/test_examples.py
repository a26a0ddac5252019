"""The shipped example workflows, run against loopback servers standing in for Ollama and a frontier API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Project, tierflow

from orchestrator.testing import OllamaServer, OpenAIServer, Reply


@pytest.fixture
def shipped(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    """The repo's workflows and agents, with the repo's tier names pointed at loopback servers."""
    ollama.models.append("qwen2.5:7b")
    local = {"api_base": ollama.url, "timeout_s": 5}
    tiers = {
        "light": {"local": True, "models": [{"model": "ollama/llama3.2:1b", **local}]},
        "standard": {"local": True, "models": [{"model": "ollama/qwen2.5:7b", **local}]},
        "reasoning": {
            "models": [
                {
                    "model": "anthropic/claude-sonnet-4-5",
                    "api_base": f"{frontier.url}/v1",
                    "api_key_env": "TEST_FRONTIER_KEY",
                },
                {"model": "openai/gpt-4.1", "api_base": f"{frontier.url}/v1"},
            ]
        },
    }
    shipped_config = yaml.safe_load((REPO / "tierflow.yaml").read_text())
    project = Project(tmp_path / "shipped", {"tiers": tiers, "tools": shipped_config["tools"]})
    shutil.rmtree(project.root / "agents")
    shutil.copytree(REPO / "agents", project.root / "agents")
    shutil.copytree(REPO / "workflows", project.root / "workflows", dirs_exist_ok=True)
    shutil.copytree(REPO / "examples", project.root / "examples")
    return project


def by_prompt(routes: dict[str, str]) -> object:
    def answer(body: dict) -> Reply:
        prompt = body["messages"][-1]["content"]
        for needle, text in routes.items():
            if needle in prompt:
                return Reply(text=text)
        return Reply(text="generic answer")

    return answer


def test_support_triage_runs_every_kind_of_step(
    shipped: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ticket = "I was charged twice! Card 4111 1111 1111 1111, call me at 555-0100. — Ana"
    ollama.responder = by_prompt(
        {
            "Label this ticket": json.dumps({"category": "billing", "urgency": 5}),
            "Translate:": "translated",
            "Draft a short reply": "Sorry, Ana: refund on its way.",
            "What is the likely cause": "Probably a retried payment; refund the duplicate first.",
            ticket: "I was charged twice! Card [REDACTED], call me at [REDACTED]. — [REDACTED]",
        }
    )
    result = shipped.run("support-triage", {"ticket": ticket, "attachments": ["hola", "bonjour"]})
    assert result.status == "succeeded", result.error
    assert result.outputs["classify"] == {"category": "billing", "urgency": 5}
    assert result.outputs["translate"] == ["translated", "translated"]
    assert result.outputs["analyze"] == "Probably a retried payment; refund the duplicate first."
    assert result.outputs["reply"] == "Sorry, Ana: refund on its way."
    calls = shipped.calls(result.run_id)
    # The ticket is confidential: every step that reads it, even through redact's
    # output, ran on a local tier, and the frontier heard nothing.
    tiers = {c["step_id"]: c["tier_used"] for c in calls}
    assert tiers == {
        "classify": "light",
        "redact": "light",
        "analyze": "standard",
        "translate": "light",
        "reply": "standard",
    }
    assert frontier.requests == []


def test_support_triage_sensitive_step_fails_closed(
    shipped: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ticket = "Secret account 998877 is locked"
    ollama.responder = lambda body: (
        Reply(status=500, text="local model crashed")
        if body["messages"][-1]["content"] == ticket
        else Reply(text=json.dumps({"category": "bug", "urgency": 2}))
    )
    result = shipped.run("support-triage", {"ticket": ticket})
    assert result.status == "failed"
    assert "redact" in (result.error or "")
    assert frontier.requests == []  # zero requests reached a non-local tier


def test_report_reasoning_step_runs_on_the_frontier(
    shipped: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ollama.responder = by_prompt(
        {
            "List every number": json.dumps({"figures": [{"what": "churn", "value": "4%"}]}),
            "Summarise": "Churn is 4%; act on onboarding.",
        }
    )
    frontier.reply(
        Reply(text="Churn doubled; fix onboarding.", prompt_tokens=1000, completion_tokens=200)
    )
    result = shipped.run("report", {"notes": "churn rose to 4% from 2%"})
    assert result.status == "succeeded", result.error
    assert "churn = 4%" in frontier.chat_requests()[0]["messages"][-1]["content"]
    every = shipped.calls(result.run_id)
    # The first reasoning model has no key here: skipped and recorded; the second answered.
    assert [(c["model"], c["outcome"]) for c in every if c["step_id"] == "recommend"] == [
        ("anthropic/claude-sonnet-4-5", "unavailable"),
        ("openai/gpt-4.1", "ok"),
    ]
    calls = {c["step_id"]: c for c in every if c["outcome"] == "ok"}
    assert calls["recommend"]["tier_used"] == "reasoning"
    assert calls["figures"]["tier_used"] == calls["summary"]["tier_used"] == "light"
    assert calls["recommend"]["cost_usd"] > 0 and calls["summary"]["cost_usd"] == 0


CANARY = "CANARY-5f1e-ticket-text"


def answer_locally(scenario: str) -> object:
    """Local answers: all unusable (not JSON, or a crashed model), or a redactor that
    copies the ticket unchanged, as a 135M model may, with valid labels."""

    def answer(body: dict) -> Reply:
        prompt = body["messages"][-1]["content"]
        if scenario == "garbage":
            return Reply(text="}{ not an answer")
        if scenario == "crash" or prompt.startswith("Translate:"):
            return Reply(status=500, text="local model crashed")
        if "Label this ticket" in prompt:
            return Reply(text=json.dumps({"category": "bug", "urgency": 5}))
        return Reply(text=prompt)  # echoes the ticket into the step's output

    return answer


@pytest.mark.parametrize("scenario", ["garbage", "crash", "echo"])
def test_support_triage_never_sends_the_confidential_ticket_to_the_frontier(
    shipped: Project, ollama: OllamaServer, frontier: OpenAIServer, scenario: str
) -> None:
    ollama.responder = answer_locally(scenario)
    # The frontier would answer every step well, so nothing but taint keeps a step local.
    frontier.responder = lambda body: Reply(text=json.dumps({"category": "bug", "urgency": 5}))
    ticket = f"My account {CANARY} is locked, card 4111 1111 1111 1111"
    result = shipped.run("support-triage", {"ticket": ticket, "attachments": ["hola"]})

    leaked = [r for r in frontier.requests if CANARY in json.dumps(r)]
    assert leaked == []
    calls = shipped.calls(result.run_id)
    remote = {c["step_id"] for c in calls if c["tier_used"] == "reasoning"}
    if scenario == "echo":
        # Every step that reads the ticket, even through another step's output, stayed
        # local; the attachments are not confidential, and their step reached the frontier.
        assert result.status == "succeeded", result.error
        assert remote == {"translate"}
        assert [r["messages"][-1]["content"] for r in frontier.chat_requests()] == [
            "Translate: hola"
        ]
    else:
        assert result.status == "failed"
        assert remote == set()


def test_support_agent_looks_the_order_up_and_waits_for_a_person(
    shipped: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    """The tool runs for real (examples/shop.py); the run waits; an approval finishes it."""

    def answer(body: dict) -> Reply:
        last = body["messages"][-1]
        if last["role"] == "tool":
            order = json.loads(last["content"])
            return Reply(
                text=f"Order {order['order_id']} is {order['status']} with {order['carrier']}."
            )
        if body.get("tools"):
            return Reply(text="", tool_calls=(("lookup_order", {"order_id": "A1001"}),))
        return Reply(text=f"Hi Ana! {last['content'].split('says: ')[1].splitlines()[0]}")

    ollama.responder = answer
    first = shipped.run("support-agent", {})
    assert first.status == "waiting", first.error
    tool_turns = [
        c["outcome"] for c in shipped.calls(first.run_id) if c["step_id"] == "investigate"
    ]
    assert tool_turns == ["tool_calls", "ok"]
    gate = next(s for s in shipped.steps(first.run_id) if s["step_id"] == "review")
    assert gate["output"] == {
        "message": "Send Ana a reply saying: Order A1001 is shipped with DHL."
    }

    decided = tierflow("approve", first.run_id, "review", "--by", "lead", cwd=shipped.root)
    assert decided.returncode == 0, decided.stderr
    found = json.loads(tierflow("show", first.run_id, "--json", cwd=shipped.root).stdout)
    assert found["status"] == "succeeded"
    assert found["outputs"]["reply"] == "Hi Ana! Order A1001 is shipped with DHL."
    assert [t["name"] for t in found["tools"]] == ["lookup_order"]
    assert frontier.requests == []
