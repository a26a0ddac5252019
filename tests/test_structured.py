"""Structured output on servers as they are: a model entry's ``structured:`` form,
and the fall back from a form the server refuses to the next one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Project

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
# What llama-cpp-python's server (0.3.36) answers to response_format json_schema.
LLAMA_CPP_REFUSAL = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'),"
    " 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema',"
    " 'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File \"/srv/llama_cpp/server/app.py\","
    " line 376, in create_chat_completion\n    POST /v1/chat/completions"
)


def project_on(root: Path, server: OpenAIServer, **model: Any) -> Project:
    entry = {"model": "openai/gpt-4o-mini", "api_base": f"{server.url}/v1", **model}
    project = Project(root, {"tiers": {"only": {"models": [entry]}}})
    steps = [
        {"id": "first", "agent": "helper", "tier": "only", "output": SCHEMA},
        {
            "id": "second",
            "agent": "helper",
            "tier": "only",
            "output": copy.deepcopy(SCHEMA),
            "needs": ["first"],
        },
    ]
    project.workflow({"name": "ask", "steps": steps})
    return project


def form(request: dict[str, Any]) -> str:
    return str((request.get("response_format") or {}).get("type", "none"))


def json_object_only(request: dict[str, Any]) -> Reply:
    """A server like llama-cpp-python's: json_object or text, nothing else."""
    if form(request) == "json_schema":
        return Reply(status=500, text=LLAMA_CPP_REFUSAL)
    return Reply(text='{"n": 3}')


def test_a_refused_form_falls_back_and_is_remembered_for_the_model(
    tmp_path: Path, frontier: OpenAIServer
) -> None:
    frontier.responder = json_object_only
    project = project_on(tmp_path, frontier)
    result = project.run("ask")
    assert result.status == "succeeded", result.error
    assert result.outputs == {"first": {"n": 3}, "second": {"n": 3}}
    assert [form(r) for r in frontier.chat_requests()] == [
        "json_schema",
        "json_object",
        "json_object",
    ]
    calls = project.calls(result.run_id)
    assert [(c["step_id"], c["attempt"], c["outcome"]) for c in calls] == [
        ("first", 1, "error"),
        ("first", 2, "ok"),
        ("second", 1, "ok"),
    ]
    # The server's own words are kept, not cut to their first line.
    assert "Input should be 'text' or 'json_object'" in calls[0]["error"]
    assert len(calls[0]["error"]) <= 500
    # json_object carries the schema (llama-cpp-python's server makes a grammar of it),
    # and the instructions name it, since json_object alone says nothing of its shape.
    fallback = frontier.chat_requests()[1]
    assert fallback["response_format"]["schema"] == SCHEMA
    assert json.dumps(SCHEMA) in fallback["messages"][0]["content"]


def test_a_server_that_takes_no_form_gets_none_and_the_answer_is_checked_here(
    tmp_path: Path, frontier: OpenAIServer
) -> None:
    answers = iter(['Here it is: {"n": 3}', '{"n": "three"}'])

    def plain_only(request: dict[str, Any]) -> Reply:
        if form(request) != "none":
            return Reply(status=400, text="response_format is not supported")
        return Reply(text=next(answers))

    frontier.responder = plain_only
    project = project_on(tmp_path, frontier)
    result = project.run("ask")
    assert result.status == "failed"
    assert [form(r) for r in frontier.chat_requests()] == [
        "json_schema",
        "json_object",
        "none",
        "none",
    ]
    calls = project.calls(result.run_id)
    assert [(c["step_id"], c["outcome"]) for c in calls] == [
        ("first", "error"),
        ("first", "error"),
        ("first", "ok"),
        ("second", "invalid_output"),  # the schema, checked here
    ]
    # A 400 is the server's refusal: nothing was generated, nothing is billed.
    assert [c["cost_usd"] for c in calls[:2]] == [0, 0]


@pytest.mark.parametrize(("structured", "sent"), [("json_object", "json_object"), ("none", "none")])
def test_a_model_entry_names_its_form(
    tmp_path: Path, frontier: OpenAIServer, structured: str, sent: str
) -> None:
    frontier.default = Reply(text='{"n": 1}')
    project = project_on(tmp_path, frontier, structured=structured)
    assert project.run("ask").status == "succeeded"
    assert [form(r) for r in frontier.chat_requests()] == [sent, sent]


def test_ollama_falls_back_from_a_schema_to_json(tmp_path: Path, ollama: OllamaServer) -> None:
    def json_only(request: dict[str, Any]) -> Reply:
        if isinstance(request.get("format"), dict):
            return Reply(status=400, text='invalid format: expected "json" or a JSON schema')
        return Reply(text='{"n": 2}')

    ollama.responder = json_only
    entry = {"model": "ollama/llama3.2:1b", "api_base": ollama.url}
    project = Project(tmp_path, {"tiers": {"only": {"local": True, "models": [entry]}}})
    project.workflow(
        {"name": "ask", "steps": [{"id": "a", "agent": "helper", "tier": "only", "output": SCHEMA}]}
    )
    result = project.run("ask")
    assert result.outputs == {"a": {"n": 2}}, result.error
    assert [r.get("format") for r in ollama.chat_requests()] == [SCHEMA, "json"]
