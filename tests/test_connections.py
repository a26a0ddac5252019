"""Provider connections are shared in a process: closing one client never cuts off another's call."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from conftest import frontier_project

import orchestrator
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def test_closing_a_client_leaves_the_calls_of_others_on_its_loop_alone(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    # litellm keeps one set of HTTP connections per process and event loop. Two
    # runs on one loop, each with its own client (a web handler's, a test's): the
    # one that ends first must not close the connection the other is waiting on.
    closed = threading.Event()

    def answer(body: dict[str, Any]) -> Reply:
        if body["messages"][-1]["content"] == "slow":
            closed.wait(timeout=20)  # answer only once the other client has closed
        return Reply(text="fine", prompt_tokens=10, completion_tokens=5)

    frontier.responder = answer
    project = frontier_project(tmp_path / "p", ollama, frontier, {})
    config = str(project.config)

    async def both() -> tuple[orchestrator.RunResult, orchestrator.RunResult]:
        waiting, quick = orchestrator.Client(config=config), orchestrator.Client(config=config)
        slow = asyncio.ensure_future(waiting.arun("ask", {"text": "slow"}))
        while len(frontier.chat_requests()) < 1:  # its request is at the server
            await asyncio.sleep(0.01)
        fast = await quick.arun("ask", {"text": "fast"})
        await quick.aclose()
        closed.set()
        result = await slow
        await waiting.aclose()
        return fast, result

    fast, slow = asyncio.run(both())
    assert (fast.status, fast.error) == ("succeeded", None)
    assert (slow.status, slow.error) == ("succeeded", None)
    assert slow.outputs == {"answer": "fine"}
