"""Tools from MCP servers over stdio: real servers built with the official ``mcp``
package, started by tierflow through the package's own client, called by a
model behind the real ``ollama`` client against a loopback server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for
from test_tools import chats, ran_tools

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

REPO = Path(__file__).resolve().parents[1]

# A second server, with the faults a server can have: a tool that hangs, and one
# that takes the whole server down.
FLAKY = '''
import asyncio, os
from mcp.server.mcpserver import MCPServer

server = MCPServer("flaky")


@server.tool()
def echo(text: str) -> str:
    """Say it back."""
    return f"echo: {text} (server {os.getpid()})"


@server.tool()
async def hang(seconds: float) -> str:
    """Answer late."""
    await asyncio.sleep(seconds)
    return "late"


@server.tool()
def die() -> str:
    """End the server."""
    os._exit(3)


server.run()
'''


def mcp_project(root: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    project = Project(
        root,
        {
            "tiers": tiers_for(ollama, frontier),
            "mcp": {
                "notes": {
                    "command": [sys.executable, str(REPO / "examples" / "notes_server.py")],
                    "env": ["NOTES_DIR"],
                },
                "flaky": {"command": [sys.executable, "flaky.py"], "timeout_s": 0.5},
            },
        },
    )
    (root / "flaky.py").write_text(FLAKY)
    project.agent(
        "reader",
        system="You answer from the notes.",
        prompt="{{ inputs.text }}",
        tools=["notes.list_notes", "notes.read_note", "flaky.echo", "flaky.hang", "flaky.die"],
        max_turns=4,
    )
    project.workflow(
        {"name": "ask-notes", "steps": [{"id": "answer", "agent": "reader", "tier": "light"}]}
    )
    return project


@pytest.fixture
def notes(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> Project:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "returns.txt").write_text("Returns within 30 days.")
    # Passed on to the server because tierflow.yaml names it (env: [NOTES_DIR]).
    monkeypatch.setenv("NOTES_DIR", str(folder))
    return mcp_project(tmp_path / "p", ollama, frontier)


def test_a_model_reads_a_note_through_an_mcp_server(notes: Project, ollama: OllamaServer) -> None:
    ollama.reply(
        Reply(text="", tool_calls=(("read_note", {"name": "returns"}),)),
        Reply(text="You have 30 days."),
    )
    result = notes.run("ask-notes", {"text": "How long do I have to return it?"})
    assert result.status == "succeeded", result.error
    assert result.outputs["answer"] == "You have 30 days."

    first, second = chats(ollama)
    offered = {tool["function"]["name"]: tool["function"] for tool in first["tools"]}
    # The model sees each tool under its own name, with the server's schema.
    assert set(offered) == {"list_notes", "read_note", "echo", "hang", "die"}
    assert offered["read_note"]["parameters"]["required"] == ["name"]
    assert offered["read_note"]["description"].startswith("The text of the note")
    answer = second["messages"][-1]
    assert (answer["role"], answer["tool_name"]) == ("tool", "read_note")
    assert answer["content"] == "Returns within 30 days."  # from the folder NOTES_DIR names

    (ran,) = ran_tools(notes, result.run_id)
    assert (ran["name"], ran["outcome"]) == ("read_note", "ok")
    assert ran["result_bytes"] == len(b"Returns within 30 days.")


def test_an_mcp_tools_error_goes_back_to_the_model_and_bad_arguments_escalate(
    notes: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ollama.reply(
        Reply(text="", tool_calls=(("read_note", {"name": "prices"}),)),
        Reply(text="", tool_calls=(("read_note", {"title": "returns"}),)),
    )
    frontier.reply(Reply(text="Thirty days."))
    result = notes.run("ask-notes", {"text": "?"})
    assert result.status == "succeeded", result.error
    told = chats(ollama)[1]["messages"][-1]["content"]
    assert "no note called 'prices'" in told  # the server's own message (is_error)
    errored, refused = ran_tools(notes, result.run_id)
    assert (errored["outcome"], refused["outcome"]) == ("error", "refused")
    # Arguments are checked against the server's schema before the call.
    assert "'name' is a required property" in refused["error"]
    outcomes = [c["outcome"] for c in notes.calls(result.run_id)]
    assert outcomes == ["tool_calls", "invalid_output", "ok"]


def test_a_hanging_mcp_tool_is_cut_and_a_dead_server_is_started_again(
    notes: Project, ollama: OllamaServer
) -> None:
    def echoed(text: str) -> str:
        told = (m.get("content") or "" for body in chats(ollama) for m in body["messages"])
        reply = next(content for content in told if content.startswith(f"echo: {text}"))
        assert reply.startswith(f"echo: {text} (server ")
        return reply.rsplit(" ", 1)[1]  # the server's pid

    ollama.reply(
        Reply(text="", tool_calls=(("hang", {"seconds": 30}),)),
        Reply(text="", tool_calls=(("echo", {"text": "one"}),)),
        Reply(text="done"),
    )
    first = notes.run("ask-notes", {"text": "?"})
    assert first.status == "succeeded", first.error
    hung, ok = ran_tools(notes, first.run_id)
    assert hung["outcome"] == "timeout" and "no result within 0.5s" in hung["error"]
    assert ok["outcome"] == "ok"  # the same session still answers after a cut call

    ollama.reply(
        Reply(text="", tool_calls=(("die", {}),)),
        Reply(text="", tool_calls=(("echo", {"text": "two"}),)),
        Reply(text="done"),
    )
    second = notes.run("ask-notes", {"text": "?"})
    assert second.status == "succeeded", second.error
    died, ok = ran_tools(notes, second.run_id)
    assert died["outcome"] == "error" and "the MCP call failed" in died["error"]
    # The next call started the server again, and it answered.
    assert ok["outcome"] == "ok"
    assert echoed("one") != echoed("two")


def test_tools_lists_each_mcp_servers_tools(notes: Project) -> None:
    proc = tierflow("tools", "--json", cwd=notes.root)
    assert proc.returncode == 0, proc.stderr
    listed = {tool["name"]: tool for tool in json.loads(proc.stdout)}
    assert {"notes.list_notes", "notes.read_note", "flaky.echo"} <= set(listed)
    assert listed["notes.read_note"]["source"].startswith("mcp notes: ")
    assert listed["flaky.hang"]["timeout_s"] == 0.5
    assert listed["notes.read_note"]["parameters"]["properties"]["name"]["type"] == "string"


@pytest.mark.parametrize(
    ("server", "agent_tools", "said", "where"),
    [
        (
            None,
            ["notes.read_nte"],
            "has no tool 'read_nte' (did you mean 'read_note'?)",
            "tierflow.yaml:",
        ),
        (
            None,
            ["note.read_note"],
            "unknown tool 'note.read_note' (did you mean 'notes'?)",
            "ask-notes.yaml:4: steps[0].agent",
        ),
        (
            {"command": ["/nonexistent/server"]},
            ["notes.read_note"],
            "did not start",
            "tierflow.yaml:",
        ),
        (
            {"command": [sys.executable, "-c", "import sys; sys.exit(1)"]},
            ["notes.read_note"],
            "did not start",
            "tierflow.yaml:",
        ),
    ],
)
def test_an_mcp_tool_that_cannot_be_offered_is_refused_at_load(
    notes: Project, server: dict[str, Any] | None, agent_tools: list[str], said: str, where: str
) -> None:
    if server is not None:
        config = json.loads(json.dumps(__import__("yaml").safe_load(notes.config.read_text())))
        config["mcp"]["notes"] = server
        notes.write("tierflow.yaml", config)
    notes.agent("reader", prompt="{{ inputs.text }}", tools=agent_tools)
    proc = tierflow("validate", str(notes.root / "workflows" / "ask-notes.yaml"), cwd=notes.root)
    assert proc.returncode == 2, proc.stdout
    assert said in proc.stdout + proc.stderr
    assert where in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_tools_the_model_would_know_by_one_name_are_refused(notes: Project) -> None:
    config = json.loads(json.dumps(__import__("yaml").safe_load(notes.config.read_text())))
    config["mcp"]["more"] = json.loads(json.dumps(config["mcp"]["flaky"]))
    notes.write("tierflow.yaml", config)
    notes.agent("reader", prompt="{{ inputs.text }}", tools=["flaky.echo", "more.echo"])
    proc = tierflow("validate", str(notes.root / "workflows" / "ask-notes.yaml"), cwd=notes.root)
    assert proc.returncode == 2
    assert "two tools the model would know as 'echo'" in proc.stdout + proc.stderr
