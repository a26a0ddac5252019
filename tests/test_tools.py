"""Tools: the loop through the real litellm and ollama clients against loopback
servers that ask for tool calls, every turn and tool call in the ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Project, kill, start_run, tierflow, tiers_for, wait_for
from sqlalchemy import select

from orchestrator.store.tables import tool_calls
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

SHOP = '''
import asyncio


def lookup_order(order_id: str, verbose: bool = False) -> dict:
    """Look an order up by its id.

    Returns its status and where it ships.
    """
    if order_id == "BAD":
        raise KeyError(order_id)
    return {"order_id": order_id, "status": "shipped", "to": "Lisbon"}


async def wait_forever(seconds: float) -> str:
    """Never returns in time."""
    await asyncio.sleep(seconds)
    return "late"


def big(size: int) -> str:
    """A long result."""
    return "x" * size


def contact(order_id: str) -> str:
    """Who ordered it."""
    return "ana@example.com"


def untyped(order_id):
    return order_id


def pause(seconds: float) -> str:
    """Wait a while."""
    import time

    time.sleep(seconds)
    return "waited"
'''


def tool_project(root: Path, ollama: OllamaServer, frontier: OpenAIServer, **tiers: Any) -> Project:
    project = Project(
        root,
        {
            "tiers": tiers or tiers_for(ollama, frontier),
            "tools": {
                "lookup_order": "shop:lookup_order",
                "wait_forever": {"call": "shop:wait_forever", "timeout_s": 0.3},
                "big": {"call": "shop:big", "max_output_bytes": 64},
                "contact": "shop:contact",
                "pause": {"call": "shop:pause", "timeout_s": 120},
            },
            "lease_ttl_s": 1,
        },
    )
    (root / "shop.py").write_text(SHOP)
    project.agent(
        "clerk",
        system="You help with orders.",
        prompt="{{ inputs.text }}",
        tools=["lookup_order", "wait_forever", "big", "contact", "pause"],
        max_turns=3,
    )
    project.workflow(
        {
            "name": "desk",
            "steps": [{"id": "answer", "agent": "clerk", "tier": "light"}],
        }
    )
    return project


@pytest.fixture
def shop(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    return tool_project(tmp_path / "shop", ollama, frontier)


def ran_tools(project: Project, run_id: str) -> list[dict[str, Any]]:
    store = project.store()
    try:
        with store.engine.connect() as connection:
            query = (
                select(tool_calls).where(tool_calls.c.run_id == run_id).order_by(tool_calls.c.id)
            )
            return [dict(row) for row in connection.execute(query).mappings()]
    finally:
        store.engine.dispose()


def chats(server: OllamaServer | OpenAIServer) -> list[dict[str, Any]]:
    return [body for body in server.requests if body.get("messages")]


def test_an_ollama_model_calls_a_tool_and_answers_with_its_result(
    shop: Project, ollama: OllamaServer
) -> None:
    ollama.reply(
        Reply(text="", tool_calls=(("lookup_order", {"order_id": "A1"}),)),
        Reply(text="Your order A1 has shipped to Lisbon."),
    )
    result = shop.run("desk", {"text": "Where is order A1?"})
    assert result.status == "succeeded", result.error
    assert result.outputs["answer"] == "Your order A1 has shipped to Lisbon."

    first, second = chats(ollama)
    offered = {tool["function"]["name"]: tool["function"] for tool in first["tools"]}
    assert offered["lookup_order"]["description"] == "Look an order up by its id."
    assert offered["lookup_order"]["parameters"]["required"] == ["order_id"]
    # Ollama's own shape: arguments as an object, the answer naming its tool.
    assert second["messages"][-2]["tool_calls"] == [
        {"function": {"name": "lookup_order", "arguments": {"order_id": "A1"}}}
    ]
    assert second["messages"][-1]["role"] == "tool"
    assert second["messages"][-1]["tool_name"] == "lookup_order"
    assert json.loads(second["messages"][-1]["content"]) == {
        "order_id": "A1",
        "status": "shipped",
        "to": "Lisbon",
    }

    turns = shop.calls(result.run_id)
    assert [c["outcome"] for c in turns] == ["tool_calls", "ok"]
    assert all(c["prompt_tokens"] > 0 for c in turns)
    (ran,) = ran_tools(shop, result.run_id)
    assert (ran["name"], ran["outcome"], ran["attempt"]) == (
        "lookup_order",
        "ok",
        turns[0]["attempt"],
    )
    assert ran["arguments_bytes"] == len(json.dumps({"order_id": "A1"}))
    assert ran["result_bytes"] == len(second["messages"][-1]["content"].encode())


def test_a_litellm_model_calls_a_tool_in_openais_shape(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = tool_project(tmp_path / "p", ollama, frontier)
    project.workflow(
        {"name": "desk", "steps": [{"id": "answer", "agent": "clerk", "tier": "frontier"}]}
    )
    frontier.reply(
        Reply(text="", tool_calls=(("lookup_order", {"order_id": "B2"}),)),
        Reply(text="B2 shipped."),
    )
    result = project.run("desk", {"text": "Where is B2?"})
    assert result.status == "succeeded", result.error
    assert result.outputs["answer"] == "B2 shipped."
    second = chats(frontier)[1]
    assistant, answer = second["messages"][-2], second["messages"][-1]
    call = assistant["tool_calls"][0]
    assert call["function"] == {"name": "lookup_order", "arguments": '{"order_id": "B2"}'}
    assert answer["role"] == "tool" and answer["tool_call_id"] == call["id"]
    assert "name" not in answer
    assert [c["outcome"] for c in project.calls(result.run_id)] == ["tool_calls", "ok"]


@pytest.mark.parametrize(
    ("asked", "said"),
    [
        (("refund", {"order_id": "A1"}), "unknown tool 'refund'"),
        (("lookup_order", {"order": "A1"}), "arguments of lookup_order: order_id: Field required"),
        (("lookup_order", '{"order_id": '), "arguments of lookup_order are not JSON"),
    ],
)
def test_a_malformed_tool_call_is_invalid_output_and_escalates(
    shop: Project, ollama: OllamaServer, frontier: OpenAIServer, asked: tuple[str, Any], said: str
) -> None:
    if isinstance(asked[1], str):  # Ollama sends objects: a broken call comes from OpenAI's shape
        shop.workflow(
            {"name": "desk", "steps": [{"id": "answer", "agent": "clerk", "tier": "frontier"}]}
        )
        frontier.reply(Reply(text="", tool_calls=(asked,)))
        result = shop.run("desk", {"text": "?"})
        assert result.status == "failed"
    else:
        ollama.reply(Reply(text="", tool_calls=(asked,)))
        frontier.reply("escalated answer")
        result = shop.run("desk", {"text": "?"})
        assert result.outputs["answer"] == "escalated answer"
    first = shop.calls(result.run_id)[0]
    assert first["outcome"] == "invalid_output"
    assert said in first["error"]
    assert ran_tools(shop, result.run_id)[0]["outcome"] == "refused"


def test_a_tools_own_error_goes_back_to_the_model_once(
    shop: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ollama.reply(
        Reply(text="", tool_calls=(("lookup_order", {"order_id": "BAD"}),)),
        Reply(text="I could not find that order."),
    )
    result = shop.run("desk", {"text": "Where is BAD?"})
    assert result.outputs["answer"] == "I could not find that order."
    told = chats(ollama)[1]["messages"][-1]["content"]
    assert told == "error: KeyError: 'BAD'"
    assert [t["outcome"] for t in ran_tools(shop, result.run_id)] == ["error"]

    ollama.reply(
        Reply(text="", tool_calls=(("lookup_order", {"order_id": "BAD"}),)),
        Reply(text="", tool_calls=(("lookup_order", {"order_id": "BAD"}),)),
    )
    frontier.reply("from the frontier")
    again = shop.run("desk", {"text": "Where is BAD?"})
    assert again.outputs["answer"] == "from the frontier"
    outcomes = [c["outcome"] for c in shop.calls(again.run_id)]
    assert outcomes == ["tool_calls", "error", "ok"]
    assert "failed again" in shop.calls(again.run_id)[1]["error"]


def test_a_hanging_tool_is_cut_at_its_timeout_and_the_step_goes_on(
    shop: Project, ollama: OllamaServer
) -> None:
    ollama.reply(
        Reply(text="", tool_calls=(("wait_forever", {"seconds": 30}),)),
        Reply(text="It took too long; try later."),
    )
    result = shop.run("desk", {"text": "wait"})
    assert result.outputs["answer"] == "It took too long; try later."
    (ran,) = ran_tools(shop, result.run_id)
    assert ran["outcome"] == "timeout" and ran["duration_ms"] < 5000
    assert chats(ollama)[1]["messages"][-1]["content"] == "error: no result within 0.3s"


def test_a_tool_call_is_in_the_ledger_before_the_tool_runs_and_survives_a_killed_worker(
    shop: Project, ollama: OllamaServer
) -> None:
    ollama.reply(
        Reply(text="", tool_calls=(("pause", {"seconds": 60}),)),
        Reply(text="", tool_calls=(("pause", {"seconds": 0}),)),
        Reply(text="done"),
    )
    proc = start_run(shop, "desk")
    try:
        # The row is there while the tool runs, before any result.
        wait_for(lambda: [t["outcome"] for t in ran_tools(shop, run_of(shop))] == ["running"])
    finally:
        kill(proc)  # SIGKILL, mid-tool
    run_id = run_of(shop)
    time.sleep(1.2)  # the dead process's lease goes stale
    resumed = tierflow("resume", run_id, cwd=shop.root)
    assert resumed.returncode == 0, resumed.stderr
    first, second = ran_tools(shop, run_id)
    # The cut-off call stays on record: the worker died in it, so it may have had its effect.
    assert (first["name"], first["outcome"], first["attempt"]) == ("pause", "interrupted", 1)
    assert "may have had its effect" in first["error"]
    assert (second["outcome"], second["attempt"]) == ("ok", 2)


def run_of(project: Project) -> str:
    """The id of the project's newest run ("" before it has one)."""
    store = project.store()
    try:
        runs = store.runs()
    finally:
        store.engine.dispose()
    return str(runs[0]["id"]) if runs else ""


def test_a_long_result_is_cut_and_the_model_is_told(shop: Project, ollama: OllamaServer) -> None:
    ollama.reply(Reply(text="", tool_calls=(("big", {"size": 1000}),)), Reply(text="ok"))
    result = shop.run("desk", {"text": "big"})
    (ran,) = ran_tools(shop, result.run_id)
    assert (ran["outcome"], ran["result_bytes"]) == ("truncated", 1000)
    sent = chats(ollama)[1]["messages"][-1]["content"]
    assert sent == "x" * 64 + "\n[cut: the result was 1000 bytes; 64 are shown]"


def test_no_answer_within_max_turns_is_invalid_output(
    shop: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    asking = Reply(text="", tool_calls=(("lookup_order", {"order_id": "A1"}),))
    ollama.reply(asking, asking, asking)
    frontier.reply("done")
    result = shop.run("desk", {"text": "loop"})
    assert result.outputs["answer"] == "done"
    outcomes = [c["outcome"] for c in shop.calls(result.run_id)]
    assert outcomes == ["tool_calls", "tool_calls", "invalid_output", "ok"]
    assert "no answer within max_turns 3" in shop.calls(result.run_id)[2]["error"]
    # The last turn's tools are not run: nobody would read their results.
    assert len(ran_tools(shop, result.run_id)) == 2


def test_a_secret_in_a_tools_error_is_masked(
    shop: Project, ollama: OllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_API_KEY", "sk-shop-0123456789abcdef")
    # A module of its own: this process imported shop already, and keeps that one.
    (shop.root / "leaky_shop.py").write_text(
        "import os\n\n\ndef leaky(order_id: str) -> str:\n"
        '    """Fails quoting its key."""\n'
        "    raise RuntimeError('401 for key=' + os.environ['SHOP_API_KEY'])\n"
    )
    config = yaml.safe_load(shop.config.read_text())
    config["tools"]["leaky"] = "leaky_shop:leaky"
    shop.write("tierflow.yaml", config)
    shop.agent("clerk", prompt="{{ inputs.text }}", tools=["leaky"])
    ollama.reply(Reply(text="", tool_calls=(("leaky", {"order_id": "A1"}),)), Reply(text="sorry"))
    result = shop.run("desk", {"text": "?"})
    assert result.status == "succeeded", result.error
    told = chats(ollama)[1]["messages"][-1]["content"]
    assert "sk-shop-0123456789abcdef" not in told and "401 for key=" in told
    (ran,) = ran_tools(shop, result.run_id)
    assert "sk-shop-0123456789abcdef" not in ran["error"]


def test_personal_data_in_a_tool_result_never_reaches_a_hosted_tier(
    shop: Project, frontier: OpenAIServer
) -> None:
    shop.workflow(
        {"name": "desk", "steps": [{"id": "answer", "agent": "clerk", "tier": "frontier"}]}
    )
    frontier.reply(Reply(text="", tool_calls=(("contact", {"order_id": "A1"}),)), "leaked")
    result = shop.run("desk", {"text": "who ordered A1?"})
    assert result.status == "failed"
    assert "result holds personal data (email)" in (result.error or "")
    assert len(chats(frontier)) == 1  # the result was never sent


def test_tools_lists_each_tool_with_its_schema(shop: Project) -> None:
    listed = json.loads(tierflow("tools", "--json", cwd=shop.root).stdout)
    lookup = next(t for t in listed if t["name"] == "lookup_order")
    assert lookup["source"] == "shop:lookup_order"
    assert lookup["parameters"]["properties"]["verbose"]["default"] is False
    assert next(t for t in listed if t["name"] == "wait_forever")["timeout_s"] == 0.3
    shown = tierflow("tools", cwd=shop.root)
    assert shown.returncode == 0 and "lookup_order  shop:lookup_order" in shown.stdout


@pytest.mark.parametrize(
    ("tools", "agent_tools", "said"),
    [
        (
            {"lookup_order": "shop:lookup_order"},
            ["lookup_ordr"],
            "unknown tool 'lookup_ordr' (did you mean 'lookup_order'?)",
        ),
        ({"lookup_order": "nowhere:lookup_order"}, ["lookup_order"], "tierflow.yaml:"),
        (
            {"lookup_order": "shop:untyped"},
            ["lookup_order"],
            "parameter 'order_id' has no type hint",
        ),
    ],
)
def test_a_tool_that_cannot_be_offered_is_refused_at_load(
    shop: Project, tools: dict[str, str], agent_tools: list[str], said: str
) -> None:
    config = json.loads(json.dumps(__import__("yaml").safe_load(shop.config.read_text())))
    config["tools"] = tools
    shop.write("tierflow.yaml", config)
    shop.agent("clerk", prompt="{{ inputs.text }}", tools=agent_tools)
    proc = tierflow("validate", str(shop.root / "workflows" / "desk.yaml"), cwd=shop.root)
    assert proc.returncode == 2, proc.stdout
    assert said in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
