"""Provider failures on the wire: what each costs in the ledger, and what is retried.

A call whose request reached the provider keeps its worst case (the prompt's
upper bound plus ``max_tokens``, priced) unless the provider reported usage;
only a call that provably never left is released at $0. 429 and 5xx are asked
again on the same model before the next one. Every case is a loopback server
misbehaving for real, driven by the real litellm and ollama clients.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Project

from orchestrator.models.base import parse_retry_after
from orchestrator.models.litellm import import_litellm
from orchestrator.testing import FAILURES, LoopbackServer, OllamaServer, OpenAIServer, Reply

PRICE_IN, PRICE_OUT = Decimal(1000), Decimal(2000)  # USD per 1M tokens: every token shows
PRICES = {
    model: {"input": int(PRICE_IN), "output": int(PRICE_OUT)}
    for model in ("openai/gpt-4o-mini", "openai/gpt-4.1", "ollama/llama3.2:1b")
}
MODEL = {"openai": "openai/gpt-4o-mini", "ollama": "ollama/llama3.2:1b"}
BUDGET = {"daily_usd": 1000}  # large: every call then holds its reservation in its row

# Modes that apply to a plain request, and to a streamed one.
PLAIN = [m for m in FAILURES if m not in ("stream_cut", "no_usage")]
STREAMED = [m for m in FAILURES if m not in ("body_cut", "no_choices", "no_usage")]
CASES = [
    (protocol, mode, stream)
    for protocol in ("openai", "ollama")
    for stream, modes in ((False, PLAIN), (True, STREAMED))
    for mode in modes
]


def server_for(protocol: str) -> LoopbackServer:
    return OpenAIServer() if protocol == "openai" else OllamaServer()


def entry(protocol: str, base: str, **fields: Any) -> dict[str, Any]:
    api_base = f"{base}/v1" if protocol == "openai" else base
    return {"model": MODEL[protocol], "api_base": api_base, **fields}


def one_model(root: Path, model: dict[str, Any], **config: Any) -> Project:
    """A project whose one tier is ``model``, with workflow ``ask`` of one step on it."""
    project = Project(
        root,
        {"tiers": {"only": {"models": [model]}}, "prices": PRICES, "budget": BUDGET, **config},
    )
    project.workflow({"name": "ask", "steps": [{"id": "a", "agent": "helper", "tier": "only"}]})
    return project


def worst_case(request: dict[str, Any]) -> Decimal:
    """What the provider could bill for ``request``: its prompt as a real tokenizer
    counts it, and every completion token it was allowed."""
    litellm = import_litellm()
    prompt = litellm.token_counter(model="gpt-4o-mini", messages=request["messages"])
    allowed = request.get("max_tokens") or request.get("options", {}).get("num_predict")
    return (PRICE_IN * prompt + PRICE_OUT * allowed) / 10**6


def closed_port() -> int:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("protocol", "mode", "stream"),
    CASES,
    ids=[f"{p}-{m}-{'stream' if s else 'plain'}" for p, m, s in CASES],
)
def test_a_call_that_reached_the_provider_is_never_recorded_below_its_worst_case(
    tmp_path: Path, protocol: str, mode: str, stream: bool
) -> None:
    with server_for(protocol) as server:
        server.default = FAILURES[mode]
        project = one_model(tmp_path, entry(protocol, server.url, stream=stream, timeout_s=1))
        result = project.run("ask")
        sent = server.chat_requests()
    assert result.status == "failed"
    calls = project.calls(result.run_id)
    assert sent and len(calls) == len(sent)  # each request is its own ledger row
    assert [c["attempt"] for c in calls] == list(range(1, len(sent) + 1))
    for call, request in zip(calls, sent, strict=True):
        assert call["outcome"] in ("error", "timeout"), call
        assert call["state"] == "settled"
        if mode == "rate_limited":
            # A 429 is the provider's answer that it took nothing on: no tokens, $0.
            assert call["cost_usd"] == 0 and call["usage_source"] is None
            continue
        assert call["cost_usd"] >= worst_case(request) > 0, call
        assert call["cost_usd"] == call["reserved_usd"]  # the reservation was kept as spend
        assert call["usage_source"] == "worst_case"


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_answer_without_usage_is_counted_and_says_so(
    tmp_path: Path, protocol: str, stream: bool
) -> None:
    with server_for(protocol) as server:
        server.default = Reply(text="four words of answer", with_usage=False)
        project = one_model(tmp_path, entry(protocol, server.url, stream=stream))
        result = project.run("ask")
    assert result.status == "succeeded", result.error
    [call] = project.calls(result.run_id)
    assert call["outcome"] == "ok" and call["usage_source"] == "counted"
    assert call["prompt_tokens"] > 0 and call["completion_tokens"] >= 4
    assert 0 < call["cost_usd"] <= call["reserved_usd"]


def test_an_answer_with_usage_says_it_was_reported(tmp_path: Path) -> None:
    with OpenAIServer() as server:
        server.default = Reply(text="fine", prompt_tokens=17, completion_tokens=3)
        project = one_model(tmp_path, entry("openai", server.url))
        result = project.run("ask")
    [call] = project.calls(result.run_id)
    assert (call["prompt_tokens"], call["completion_tokens"], call["usage_source"]) == (
        17,
        3,
        "reported",
    )


def never_sent_cases(tmp_path: Path, server: OpenAIServer, ollama: OllamaServer) -> dict[str, Any]:
    return {
        "openai-refused": entry("openai", f"http://127.0.0.1:{closed_port()}"),
        "openai-dns": entry("openai", "http://no-such-host.invalid"),
        "openai-no-key": {"model": "openai/gpt-4o-mini"},
        "openai-key-env-unset": {**entry("openai", server.url), "api_key_env": "TIERFLOW_NO_KEY"},
        "ollama-refused": entry("ollama", f"http://127.0.0.1:{closed_port()}"),
        "ollama-dns": entry("ollama", "http://no-such-host.invalid"),
        "ollama-not-pulled": {"model": "ollama/qwen2.5:7b", "api_base": ollama.url},
    }


NEVER_SENT = [
    "openai-refused",
    "openai-dns",
    "openai-no-key",
    "openai-key-env-unset",
    "ollama-refused",
    "ollama-dns",
    "ollama-not-pulled",
]


@pytest.mark.parametrize("case", NEVER_SENT)
def test_only_a_call_that_never_left_is_released_at_nothing(
    tmp_path: Path, frontier: OpenAIServer, ollama: OllamaServer, case: str
) -> None:
    model = never_sent_cases(tmp_path, frontier, ollama)[case]
    project = one_model(
        tmp_path, model, prices={**PRICES, "ollama/qwen2.5:7b": dict(PRICES[MODEL["ollama"]])}
    )
    result = project.run("ask")
    assert result.status == "failed"
    [call] = project.calls(result.run_id)
    assert (call["outcome"], call["state"], call["cost_usd"]) == ("unavailable", "released", 0)
    assert call["usage_source"] is None
    assert frontier.chat_requests() == [] and ollama.chat_requests() == []


BIG_SCHEMA = {
    "type": "object",
    "properties": {
        f"field_{i}": {
            "type": "string",
            "description": f"The {i}th detail of the ticket, as the customer wrote it, word for word",
        }
        for i in range(40)
    },
    "required": ["field_0"],
}


def realistic(request: dict[str, Any]) -> Reply:
    """An answer billed as providers bill structured output: the messages and the
    schema they were sent as prompt, and every token allowed as completion."""
    litellm = import_litellm()
    schema = request.get("response_format") or request.get("format")
    prompt = litellm.token_counter(model="gpt-4o-mini", messages=request["messages"])
    prompt += litellm.token_counter(model="gpt-4o-mini", text=json.dumps(schema))
    allowed = request.get("max_tokens") or request["options"]["num_predict"]
    return Reply(text='{"field_0": "x"}', prompt_tokens=prompt, completion_tokens=allowed)


@pytest.mark.parametrize("protocol", ["openai", "ollama"])
def test_a_settled_cost_never_passes_its_reservation_when_the_schema_is_billed(
    tmp_path: Path, protocol: str
) -> None:
    with server_for(protocol) as server:
        server.responder = realistic
        project = one_model(tmp_path, entry(protocol, server.url))
        project.workflow(
            {
                "name": "ask",
                "steps": [
                    {
                        "id": "a",
                        "agent": "helper",
                        "tier": "only",
                        "prompt": "hi",
                        "output": BIG_SCHEMA,
                    }
                ],
            }
        )
        result = project.run("ask")
    assert result.status == "succeeded", result.error
    [call] = project.calls(result.run_id)
    assert call["usage_source"] == "reported"
    assert call["prompt_tokens"] > 40 * 10  # the schema was billed
    assert call["cost_usd"] <= call["reserved_usd"]


def ladder_of_two(root: Path, cheap: OpenAIServer, dear: OpenAIServer, **config: Any) -> Project:
    """Tier ``light`` on ``cheap``, then tier ``frontier`` on ``dear``; workflow ``ask`` starts light."""
    tiers = {
        "light": {"models": [entry("openai", cheap.url)]},
        "frontier": {"models": [{"model": "openai/gpt-4.1", "api_base": f"{dear.url}/v1"}]},
    }
    project = Project(root, {"tiers": tiers, "prices": PRICES, "budget": BUDGET, **config})
    project.workflow({"name": "ask", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    return project


@pytest.fixture
def dear() -> Iterator[OpenAIServer]:
    with OpenAIServer() as server:
        yield server


def test_a_rate_limit_is_asked_again_on_the_same_model_not_escalated(
    tmp_path: Path, frontier: OpenAIServer, dear: OpenAIServer
) -> None:
    project = ladder_of_two(tmp_path, frontier, dear)
    frontier.reply(FAILURES["rate_limited"], "after the wait")
    result = project.run("ask")
    assert result.status == "succeeded" and result.outputs == {"a": "after the wait"}
    assert dear.chat_requests() == []
    calls = project.calls(result.run_id)
    assert [(c["attempt"], c["tier_used"], c["outcome"], c["state"]) for c in calls] == [
        (1, "light", "error", "settled"),
        (2, "light", "ok", "settled"),
    ]
    assert "429" in calls[0]["error"]
    assert all(c["escalation_reason"] is None for c in calls)  # a retry is not an escalation


def test_server_errors_are_asked_again_twice_then_the_next_model(
    tmp_path: Path, frontier: OpenAIServer, dear: OpenAIServer
) -> None:
    project = ladder_of_two(tmp_path, frontier, dear, escalation={"max_attempts": 2})
    frontier.default = FAILURES["503"]
    dear.reply("from the next tier")
    result = project.run("ask")
    assert result.status == "succeeded" and result.outputs == {"a": "from the next tier"}
    assert len(frontier.chat_requests()) == 3  # the first try and two more
    calls = project.calls(result.run_id)
    assert [(c["attempt"], c["tier_used"], c["outcome"]) for c in calls] == [
        (1, "light", "error"),
        (2, "light", "error"),
        (3, "light", "error"),
        (4, "frontier", "ok"),
    ]
    # The three tries used one of the two attempts: the next tier still had one.
    assert all(c["cost_usd"] == c["reserved_usd"] > 0 for c in calls[:3])


def test_a_retry_after_past_the_bound_moves_on_at_once(
    tmp_path: Path, frontier: OpenAIServer, dear: OpenAIServer
) -> None:
    project = ladder_of_two(tmp_path, frontier, dear)
    frontier.default = Reply(status=429, text="Slow down", headers=(("Retry-After", "3600"),))
    dear.reply("served")
    result = project.run("ask")
    assert result.outputs == {"a": "served"}
    assert len(frontier.chat_requests()) == 1


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert parse_retry_after("2", now=now) == 2.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now=now) == 7.0
    )
    assert (
        parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now=now) == 0.0
    )
    for junk in (None, "", "soon", "-3", "nan", "inf"):
        assert parse_retry_after(junk, now=now) is None


def test_an_ollama_server_error_is_asked_again(tmp_path: Path, ollama: OllamaServer) -> None:
    project = one_model(tmp_path, entry("ollama", ollama.url))
    ollama.reply(FAILURES["503"], "recovered")
    result = project.run("ask")
    assert result.outputs == {"a": "recovered"}
    assert [c["outcome"] for c in project.calls(result.run_id)] == ["error", "ok"]
