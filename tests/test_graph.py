"""Graph behaviour: order, parallel branches, when, for_each, and template safety."""

from __future__ import annotations

import threading
import time

from conftest import Project, statuses

from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def last_prompt(request: dict) -> str:
    return request["messages"][-1]["content"]


def test_needs_order_steps_and_pass_outputs(project: Project, ollama: OllamaServer) -> None:
    project.workflow(
        {
            "name": "chain",
            "steps": [
                {
                    "id": "second",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["first"],
                    "prompt": "after {{ steps.first.output }}",
                },
                {
                    "id": "first",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "start {{ inputs.text }}",
                },
            ],
        }
    )
    ollama.reply("one", "two")
    result = project.run("chain", {"text": "now"})
    assert result.status == "succeeded"
    assert [last_prompt(r) for r in ollama.chat_requests()] == ["start now", "after one"]
    assert result.outputs == {"first": "one", "second": "two"}


def test_independent_steps_run_in_parallel(project: Project, ollama: OllamaServer) -> None:
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def slow(body: dict) -> Reply:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.3)
        with lock:
            in_flight -= 1
        return Reply(text=last_prompt(body).upper())

    ollama.responder = slow
    project.workflow(
        {
            "name": "fan",
            "steps": [
                {"id": "a", "agent": "helper", "tier": "light", "prompt": "a"},
                {"id": "b", "agent": "helper", "tier": "light", "prompt": "b"},
                {"id": "c", "agent": "helper", "tier": "light", "prompt": "c"},
                {
                    "id": "join",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["a", "b", "c"],
                    "prompt": "{{ steps.a.output }}{{ steps.b.output }}{{ steps.c.output }}",
                },
            ],
        }
    )
    result = project.run("fan")
    assert result.status == "succeeded"
    assert peak == 3  # a, b and c were in flight together
    assert result.outputs["join"] == "ABC"
    assert last_prompt(ollama.chat_requests()[-1]) == "ABC"


def test_when_false_skips_and_dependents_see_null(project: Project, ollama: OllamaServer) -> None:
    project.workflow(
        {
            "name": "cond",
            "inputs": {"urgency": {"type": "integer"}},
            "steps": [
                {
                    "id": "analyze",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "deep",
                    "when": "inputs.urgency >= 4",
                },
                {
                    "id": "reply",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["analyze"],
                    "prompt": "analysis={{ steps.analyze.output is none }}",
                },
            ],
        }
    )
    ollama.reply("answer")
    result = project.run("cond", {"urgency": 2})
    assert statuses(result.steps) == {"analyze": "skipped", "reply": "succeeded"}
    assert result.outputs["analyze"] is None
    assert [last_prompt(r) for r in ollama.chat_requests()] == ["analysis=True"]

    ollama.reply("deep answer", "answer")
    result = project.run("cond", {"urgency": 5})
    assert statuses(result.steps) == {"analyze": "succeeded", "reply": "succeeded"}


def test_for_each_fans_out_and_gathers_in_order(project: Project, ollama: OllamaServer) -> None:
    ollama.responder = lambda body: Reply(text=last_prompt(body)[::-1])
    project.workflow(
        {
            "name": "each",
            "inputs": {"words": {"type": "array", "items": {"type": "string"}}},
            "steps": [
                {
                    "id": "flip",
                    "agent": "helper",
                    "tier": "light",
                    "for_each": "inputs.words",
                    "prompt": "{{ item }}",
                }
            ],
        }
    )
    result = project.run("each", {"words": ["abc", "xyz", "hello"]})
    assert result.outputs["flip"] == ["cba", "zyx", "olleh"]
    calls = project.calls(result.run_id)
    assert sorted(c["item_index"] for c in calls) == [0, 1, 2]
    assert sorted(c["attempt"] for c in calls) == [
        1,
        2,
        3,
    ]  # unique per step, as the ledger key needs


def test_for_each_over_an_empty_list(project: Project, ollama: OllamaServer) -> None:
    project.workflow(
        {
            "name": "none",
            "inputs": {"words": {"type": "array", "default": []}},
            "steps": [
                {
                    "id": "flip",
                    "agent": "helper",
                    "tier": "light",
                    "for_each": "inputs.words",
                    "prompt": "{{ item }}",
                }
            ],
        }
    )
    result = project.run("none")
    assert result.status == "succeeded"
    assert result.outputs["flip"] == []
    assert ollama.chat_requests() == []


def test_input_is_data_not_a_template(project: Project, ollama: OllamaServer) -> None:
    attack = "{{ ''.__class__.__mro__ }}{% for x in range(3) %}x{% endfor %}"
    project.workflow(
        {
            "name": "echo",
            "steps": [
                {
                    "id": "say",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "Ticket: {{ inputs.text }}",
                }
            ],
        }
    )
    result = project.run("echo", {"text": attack})
    assert result.status == "succeeded"
    assert last_prompt(ollama.chat_requests()[0]) == f"Ticket: {attack}"


def test_model_output_is_data_not_a_template(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project.workflow(
        {
            "name": "relay",
            "steps": [
                {"id": "first", "agent": "helper", "tier": "light", "prompt": "go"},
                {
                    "id": "second",
                    "agent": "helper",
                    "tier": "frontier",
                    "needs": ["first"],
                    "prompt": "Got: {{ steps.first.output }}",
                },
            ],
        }
    )
    ollama.reply("{{7*7}} {{ cycler.__init__.__globals__ }}")
    frontier.reply("done")
    result = project.run("relay")
    assert result.status == "succeeded"
    assert (
        last_prompt(frontier.chat_requests()[0]) == "Got: {{7*7}} {{ cycler.__init__.__globals__ }}"
    )


def test_sandbox_blocks_unsafe_attributes_in_a_workflow_template(
    project: Project, ollama: OllamaServer
) -> None:
    project.workflow(
        {
            "name": "evil",
            "steps": [
                {
                    "id": "x",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "{{ inputs.text.__class__.__mro__ }}",
                }
            ],
        }
    )
    result = project.run("evil")
    assert result.status == "failed"
    assert "template error" in (result.error or "")
    assert ollama.chat_requests() == []


def test_failed_step_stops_its_dependents_and_keeps_the_ledger(
    project: Project, ollama, frontier
) -> None:
    project.workflow(
        {
            "name": "halt",
            "steps": [
                {"id": "first", "agent": "helper", "tier": "light", "sensitive": True},
                {"id": "second", "agent": "helper", "tier": "light", "needs": ["first"]},
            ],
        }
    )
    ollama.reply(Reply(status=400, text="broken"))
    result = project.run("halt")
    assert result.status == "failed"
    assert statuses(result.steps) == {"first": "failed"}
    calls = project.calls(result.run_id)
    assert [(c["step_id"], c["outcome"]) for c in calls] == [("first", "error")]
    store = project.store()
    found = store.run(result.run_id)
    store.engine.dispose()
    assert found is not None and found["status"] == "failed"
    assert [s["status"] for s in found["steps"]] == ["failed"]


def test_max_steps_caps_fan_out(tmp_path, ollama: OllamaServer, frontier: OpenAIServer) -> None:
    from conftest import tiers_for

    project = Project(tmp_path, {"tiers": tiers_for(ollama, frontier), "max_steps": 3})
    project.workflow(
        {
            "name": "big",
            "inputs": {"words": {"type": "array"}},
            "steps": [
                {
                    "id": "each",
                    "agent": "helper",
                    "tier": "light",
                    "for_each": "inputs.words",
                    "prompt": "{{ item }}",
                }
            ],
        }
    )
    result = project.run("big", {"words": list("abcdef")})
    assert result.status == "failed"
    assert "max_steps" in (result.error or "")
    assert len(ollama.chat_requests()) <= 3


def test_a_failed_parallel_branch_leaves_no_call_unaccounted(
    project: Project, ollama: OllamaServer
) -> None:
    def answer(body: dict) -> Reply:
        prompt = last_prompt(body)
        if prompt == "fails":
            return Reply(status=400, text="broken")
        return Reply(text="slow", delay_s=1.0)

    ollama.responder = answer
    project.write(
        "tierflow.yaml",
        {
            "tiers": {
                "light": {
                    "local": True,
                    "models": [{"model": "ollama/llama3.2:1b", "api_base": ollama.url}],
                }
            },
            "database": f"sqlite:///{project.root / 'tierflow.db'}",
        },
    )
    project.workflow(
        {
            "name": "race",
            "steps": [
                {"id": "bad", "agent": "helper", "tier": "light", "prompt": "fails"},
                {"id": "slow", "agent": "helper", "tier": "light", "prompt": "takes a while"},
            ],
        }
    )
    result = project.run("race")
    assert result.status == "failed"
    calls = {c["step_id"]: c for c in project.calls(result.run_id)}
    assert calls["bad"]["state"] == "settled" and calls["bad"]["outcome"] == "error"
    # The slow branch was cancelled mid-call: its request may have been billed.
    assert calls["slow"]["state"] == "abandoned"
