"""The tier ladder, driven by loopback servers through the real ollama and litellm clients."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from conftest import Project, tiers_for

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

CATEGORY = {
    "type": "object",
    "properties": {"category": {"enum": ["billing", "bug"]}, "urgency": {"type": "integer"}},
    "required": ["category", "urgency"],
}
GOOD = json.dumps({"category": "bug", "urgency": 4})


def one_step(project: Project, **step: object) -> None:
    project.workflow(
        {"name": "one", "steps": [{"id": "only", "agent": "helper", "tier": "light", **step}]}
    )


def outcomes(project: Project, run_id: str) -> list[tuple[str, str, str]]:
    return [(c["tier_used"], c["model"], c["outcome"]) for c in project.calls(run_id)]


def test_cheap_answer_is_kept(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, output=CATEGORY)
    ollama.reply(GOOD)
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == {"category": "bug", "urgency": 4}
    assert outcomes(project, result.run_id) == [("light", "ollama/llama3.2:1b", "ok")]
    assert frontier.chat_requests() == []


def test_error_escalates_to_next_tier(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project)
    ollama.default = Reply(status=500, text="out of memory")
    frontier.reply("from the frontier")
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == "from the frontier"
    calls = project.calls(result.run_id)
    # A 5xx is asked again twice on the same model before the step escalates.
    assert [(c["tier_used"], c["outcome"]) for c in calls] == [
        ("light", "error"),
        ("light", "error"),
        ("light", "error"),
        ("frontier", "ok"),
    ]
    assert "out of memory" in calls[0]["error"]
    assert calls[-1]["tier_asked"] == "light"
    assert "error" in calls[-1]["escalation_reason"]
    assert len(frontier.chat_requests()) == 1


def test_timeout_escalates(tmp_path, ollama: OllamaServer, frontier: OpenAIServer) -> None:
    project = Project(tmp_path, {"tiers": tiers_for(ollama, frontier, timeout_s=0.3)})
    one_step(project)
    ollama.reply(Reply(text="too late", delay_s=1.5))
    frontier.reply("in time")
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == "in time"
    calls = project.calls(result.run_id)
    assert [c["outcome"] for c in calls] == ["timeout", "ok"]
    assert calls[0]["latency_ms"] < 1400  # it gave up at the timeout, not when the server answered


def test_invalid_output_escalates(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, output=CATEGORY)
    ollama.reply('{"category": "weather", "urgency": 2}')
    frontier.reply(f"```json\n{GOOD}\n```")
    result = project.run("one")
    assert result.status == "succeeded"
    assert result.outputs["only"] == {"category": "bug", "urgency": 4}
    calls = project.calls(result.run_id)
    assert [c["outcome"] for c in calls] == ["invalid_output", "ok"]
    assert "category" in calls[0]["error"]
    # Tokens of the rejected answer were spent, so they are in the ledger.
    assert calls[0]["completion_tokens"] > 0


def test_schema_is_asked_for_natively(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, output=CATEGORY, max_tokens=77)
    ollama.reply("not json")
    frontier.reply(GOOD)
    project.run("one")
    [asked] = ollama.chat_requests()
    assert asked["format"] == CATEGORY
    assert asked["options"]["num_predict"] == 77
    [escalated] = frontier.chat_requests()
    assert escalated["response_format"]["json_schema"]["schema"] == CATEGORY
    assert escalated["max_tokens"] == 77


def test_checks_can_reject_an_answer(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, output=CATEGORY, checks=["output.urgency <= 5"])
    ollama.reply('{"category": "bug", "urgency": 9}')
    frontier.reply(GOOD)
    result = project.run("one")
    calls = project.calls(result.run_id)
    assert [c["outcome"] for c in calls] == ["invalid_output", "ok"]
    assert "output.urgency <= 5" in calls[0]["error"]


def test_models_within_a_tier_are_tried_in_order(
    tmp_path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    tiers = tiers_for(ollama, frontier)
    ollama.models.append("qwen2.5:0.5b")
    tiers["light"]["models"].append({"model": "ollama/qwen2.5:0.5b", "api_base": ollama.url})
    project = Project(tmp_path, {"tiers": tiers})
    one_step(project)
    ollama.reply(Reply(status=400, text="invalid options"), "second model answers")
    result = project.run("one")
    assert result.outputs["only"] == "second model answers"
    assert outcomes(project, result.run_id) == [
        ("light", "ollama/llama3.2:1b", "error"),
        ("light", "ollama/qwen2.5:0.5b", "ok"),
    ]
    assert frontier.chat_requests() == []


def test_unreachable_tier_is_skipped_and_recorded(tmp_path, frontier: OpenAIServer) -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    tiers = {
        "light": {
            "local": True,
            "models": [{"model": "ollama/llama3.2:1b", "api_base": f"http://127.0.0.1:{closed}"}],
        },
        "frontier": {"models": [{"model": "openai/gpt-4o-mini", "api_base": f"{frontier.url}/v1"}]},
    }
    project = Project(tmp_path, {"tiers": tiers, "escalation": {"max_attempts": 1}})
    one_step(project)
    frontier.reply("served")
    result = project.run("one")
    # The skipped tier did not use up the single attempt.
    assert result.outputs["only"] == "served"
    calls = project.calls(result.run_id)
    assert [c["outcome"] for c in calls] == ["unavailable", "ok"]
    assert "unreachable" in calls[0]["error"]


def test_model_not_pulled_is_unavailable(
    tmp_path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ollama.models[:] = ["something-else:latest"]
    project = Project(tmp_path, {"tiers": tiers_for(ollama, frontier)})
    one_step(project)
    frontier.reply("served")
    result = project.run("one")
    calls = project.calls(result.run_id)
    assert [c["outcome"] for c in calls] == ["unavailable", "ok"]
    assert "ollama pull llama3.2:1b" in calls[0]["error"]
    assert ollama.chat_requests() == []


def test_missing_credentials_skip_the_tier(
    tmp_path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["models"][0]["api_key_env"] = "TIERFLOW_TEST_UNSET_KEY"
    project = Project(tmp_path, {"tiers": tiers})
    one_step(project)
    ollama.reply(Reply(status=400, text="bad request"))
    result = project.run("one")
    assert result.status == "failed"
    calls = project.calls(result.run_id)
    assert [c["outcome"] for c in calls] == ["error", "unavailable"]
    assert "TIERFLOW_TEST_UNSET_KEY is not set" in calls[1]["error"]
    assert frontier.requests == []


def test_api_key_from_env_is_sent_and_never_stored(tmp_path, monkeypatch, ollama, frontier) -> None:
    canary = "sk-canary-" + "7" * 24
    monkeypatch.setenv("TIERFLOW_TEST_KEY", canary)
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["models"][0]["api_key_env"] = "TIERFLOW_TEST_KEY"
    project = Project(tmp_path, {"tiers": tiers})
    one_step(project, tier="frontier")
    frontier.reply("fine")
    result = project.run("one")
    assert result.status == "succeeded"
    assert frontier.chat_requests()[0]["_headers"]["authorization"] == f"Bearer {canary}"
    database = (tmp_path / "tierflow.db").read_bytes()
    wal = tmp_path / "tierflow.db-wal"
    assert canary.encode() not in database + (wal.read_bytes() if wal.exists() else b"")


def test_max_attempts_caps_the_ladder(
    tmp_path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(
        tmp_path, {"tiers": tiers_for(ollama, frontier), "escalation": {"max_attempts": 1}}
    )
    one_step(project)
    ollama.reply(Reply(status=400, text="broken"))
    result = project.run("one")
    assert result.status == "failed"
    assert "max_attempts 1" in (result.error or "")
    assert frontier.chat_requests() == []


def test_outcome_outside_escalation_on_fails_at_once(tmp_path, ollama, frontier) -> None:
    project = Project(
        tmp_path, {"tiers": tiers_for(ollama, frontier), "escalation": {"on": ["error", "timeout"]}}
    )
    one_step(project, output=CATEGORY)
    ollama.reply("no json here")
    result = project.run("one")
    assert result.status == "failed"
    assert frontier.chat_requests() == []


def test_sensitive_step_never_leaves_local_tiers(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "private",
            "steps": [
                {
                    "id": "redact",
                    "agent": "helper",
                    "tier": "light",
                    "sensitive": True,
                    "output": CATEGORY,
                },
                {
                    "id": "public",
                    "agent": "helper",
                    "tier": "frontier",
                    "prompt": "Summarise the weather.",
                },
            ],
        }
    )
    ollama.reply("not json", Reply(status=500, text="broken"), "still not json")
    frontier.reply("sunny")
    result = project.run("private", {"text": "card 4111 1111 1111 1111"})
    assert result.status == "failed"
    assert "redact" in (result.error or "")
    calls = project.calls(result.run_id)
    assert {c["tier_used"] for c in calls if c["step_id"] == "redact"} == {"light"}
    # The frontier server saw the public step and nothing of the sensitive one.
    assert all("4111" not in json.dumps(r) for r in frontier.requests)
    assert [r["messages"][-1]["content"] for r in frontier.chat_requests()] == [
        "Summarise the weather."
    ]


def test_garbled_response_is_a_failed_call_that_escalates(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, tier="frontier")
    project.write(
        "tierflow.yaml",
        {
            "tiers": {
                **tiers_for(ollama, frontier),
                "backup": {
                    "models": [{"model": "openai/gpt-4.1", "api_base": f"{frontier.url}/v1"}]
                },
            },
            "reference_model": "openai/gpt-4.1",
            "database": f"sqlite:///{project.root / 'tierflow.db'}",
        },
    )
    frontier.reply(Reply(raw=b"<html>502 from a proxy</html>"), "recovered")
    result = project.run("one")
    assert result.status == "succeeded", result.error
    calls = project.calls(result.run_id)
    assert [(c["tier_used"], c["outcome"]) for c in calls] == [
        ("frontier", "error"),
        ("backup", "ok"),
    ]


def test_a_step_with_one_tier_says_there_is_nowhere_to_escalate(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(tmp_path / "p", {"tiers": {"light": tiers_for(ollama, frontier)["light"]}})
    project.agent("helper", prompt="hi")
    one_step(project, checks=["output | length < 3"])
    ollama.reply("far too long an answer")
    result = project.run("one")
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith(
        "step 'only' failed: no tier gave a valid answer (light is the only tier: add one above it in"
        " tierflow.yaml): light/ollama/llama3.2:1b: invalid_output: check"
    )
