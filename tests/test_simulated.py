"""A tier marked simulated: litellm's mock_response answers, nothing leaves the
machine, and the ledger and every table say the figures are simulated."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import yaml
from conftest import Project, tierflow

from orchestrator.encoding import usd
from orchestrator.settings import load_settings
from orchestrator.testing import OllamaServer, OpenAIServer

MOCK = "tide pools stay"


def simulated_project(root: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    project = Project(
        root,
        {
            "tiers": {
                "light": {
                    "local": True,
                    "models": [{"model": "ollama/llama3.2:1b", "api_base": ollama.url}],
                },
                "hosted": {
                    "simulated": True,
                    # The loopback server stands where the provider would be: it
                    # must hear nothing, and no key is set for it.
                    "models": [
                        {
                            "model": "openai/gpt-4o-mini",
                            "api_base": f"{frontier.url}/v1",
                            "mock_response": MOCK,
                        }
                    ],
                },
            }
        },
    )
    project.workflow(
        {
            "name": "short",
            "steps": [
                {
                    "id": "headline",
                    "agent": "helper",
                    "tier": "light",
                    "checks": ["output | wordcount <= 3"],
                }
            ],
        }
    )
    return project


def test_a_simulated_tier_answers_with_its_mock_and_sends_nothing(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = simulated_project(tmp_path, ollama, frontier)
    ollama.reply("a headline far too long to pass the check")
    result = project.run("short")
    assert result.status == "succeeded", result.error
    assert result.outputs["headline"] == MOCK
    assert frontier.requests == []

    light, hosted = project.calls(result.run_id)
    assert (light["outcome"], light["simulated"]) == ("invalid_output", False)
    assert (hosted["tier_used"], hosted["outcome"], hosted["simulated"]) == ("hosted", "ok", True)
    assert hosted["escalation_reason"] is not None
    # litellm's mock reports made-up usage (10 in, 20 out): the tokens are counted instead.
    assert hosted["usage_source"] == "counted"
    assert 3 <= hosted["completion_tokens"] <= 6  # three words, by the model's tokenizer
    assert hosted["prompt_tokens"] not in (0, 10)
    price = load_settings(project.config).price_of("openai/gpt-4o-mini")
    tokens = (hosted["prompt_tokens"], hosted["completion_tokens"])
    assert hosted["cost_usd"] == price.cost(*tokens) > 0


def test_spend_and_run_output_say_what_is_simulated(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = simulated_project(tmp_path, ollama, frontier)
    ollama.reply("a headline far too long to pass the check")
    ran = tierflow("run", "short", cwd=project.root)
    assert ran.returncode == 0, ran.stderr
    assert "hosted (simulated) · openai/gpt-4o-mini" in ran.stdout
    assert "of the cost is simulated" in ran.stdout

    found = json.loads(tierflow("spend", "--json", cwd=project.root).stdout)
    run_id = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)[0]["id"]
    hosted = [c for c in project.calls(run_id) if c["simulated"]]
    assert Decimal(found["total"]["simulated_cost_usd"]) == hosted[0]["cost_usd"] > 0
    assert Decimal(found["total"]["cost_usd"]) == hosted[0]["cost_usd"]

    table = tierflow("spend", cwd=project.root).stdout
    assert f"{usd(hosted[0]['cost_usd'])}*" in table
    assert "of the cost is simulated" in table
    shown = tierflow("show", run_id, cwd=project.root).stdout
    assert "hosted (simulated) · openai/gpt-4o-mini  ok" in shown


def test_spend_with_no_simulated_calls_marks_nothing(
    project: Project, ollama: OllamaServer
) -> None:
    project.workflow({"name": "plain", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    ollama.reply("fine")
    assert project.run("plain").status == "succeeded"
    table = tierflow("spend", cwd=project.root).stdout
    assert "simulated" not in table and "*" not in table


def test_mock_response_on_a_tier_not_marked_simulated_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "tierflow.yaml"
    config.write_text(
        "tiers:\n"
        "  light:\n"
        "    models: [llamacpp/smollm2-135m]\n"
        "    local: true\n"
        "  hosted:\n"
        "    models:\n"
        "      - {model: openai/gpt-4o-mini, mock_response: canned}\n"
    )
    proc = tierflow("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "tierflow.yaml:5: tiers.hosted:" in proc.stderr + proc.stdout
    assert "simulated: true" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_the_dashboard_says_what_is_simulated(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    from fastapi.testclient import TestClient

    from orchestrator.api import create_app

    project = simulated_project(tmp_path, ollama, frontier)
    ollama.reply("a headline far too long to pass the check")
    result = project.run("short")
    cost = next(c["cost_usd"] for c in project.calls(result.run_id) if c["simulated"])
    app = create_app(load_settings(project.config), token="t")
    with TestClient(app, headers={"Authorization": "Bearer t"}) as client:
        page = client.get("/?token=t").text
    assert f'<p id="simulated" data-usd="{cost}">' in page
    assert f"{usd(cost)}*</td>" in page


def test_a_simulated_tier_must_not_reach_a_provider(tmp_path: Path) -> None:
    config = tmp_path / "tierflow.yaml"
    config.write_text("tiers:\n  hosted:\n    simulated: true\n    models: [openai/gpt-4o-mini]\n")
    proc = tierflow("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert "a simulated tier's models answer with mock_response" in proc.stderr + proc.stdout
    config.write_text(
        "tiers:\n"
        "  light:\n"
        "    simulated: true\n"
        "    models: [{model: ollama/llama3.2:1b, mock_response: canned}]\n"
    )
    proc = tierflow("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "mock_response is litellm's" in proc.stderr + proc.stdout


def test_a_streamed_mock_counts_its_tokens(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = simulated_project(tmp_path, ollama, frontier)
    config = yaml.safe_load(project.config.read_text())
    config["tiers"]["hosted"]["models"][0]["stream"] = True
    project.write("tierflow.yaml", config)
    ollama.reply("a headline far too long to pass the check")
    result = project.run("short")
    assert result.outputs["headline"] == MOCK
    hosted = [c for c in project.calls(result.run_id) if c["simulated"]]
    assert hosted[0]["usage_source"] == "counted"
