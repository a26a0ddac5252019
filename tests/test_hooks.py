"""Hooks around steps and calls (orchestrator.hooks) and the ledger writes they make, through real runs against loopback servers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import Project, assert_nothing_reserved, ledger

from orchestrator.hooks import CallRefused, Hooks
from orchestrator.ledger import Call, StepRecord
from orchestrator.spec import StepPlan
from orchestrator.testing import OllamaServer, OpenAIServer

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


class Recorder(Hooks):
    """Writes down what it is told, and what the ledger held at each moment."""

    def __init__(self, project: Project, cap: str | None = None) -> None:
        self.project = project
        self.cap = cap
        self.events: list[tuple[Any, ...]] = []

    async def before_step(self, plan: StepPlan) -> str | None:
        self.events.append(("before_step", plan.id))
        return self.cap

    async def before_call(self, plan: StepPlan, call: Call) -> Call:
        states = [(row["tier_used"], row["state"]) for row in ledger(self.project)]
        self.events.append(("before_call", call.tier_used, call.outcome, states))
        return call

    async def after_call(self, plan: StepPlan, call: Call) -> None:
        self.events.append(("after_call", call.tier_used, call.outcome))

    async def after_step(self, plan: StepPlan, record: StepRecord) -> None:
        self.events.append(("after_step", record.status, len(record.calls)))


def run(project: Project, hooks: list[Hooks]) -> Any:
    runner, loaded, store = project.runner("one")
    runner._hooks = tuple(hooks)
    try:
        return asyncio.run(runner.run(loaded, {}))
    finally:
        store.engine.dispose()


def one_step(project: Project, **step: Any) -> None:
    project.workflow(
        {"name": "one", "steps": [{"id": "only", "agent": "helper", "tier": "light", **step}]}
    )


def test_hooks_see_each_call_after_the_ledger_wrote_it_pending(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, output=SCHEMA)
    ollama.reply("not json")
    frontier.reply(json.dumps({"n": 3}))
    recorder = Recorder(project)
    result = run(project, [recorder])
    assert result.status == "succeeded", result.error
    assert recorder.events == [
        ("before_step", "only"),
        # The ledger's own hook comes first: the call's row is pending before any other hook.
        ("before_call", "light", "pending", [("light", "pending")]),
        ("after_call", "light", "invalid_output"),
        ("before_call", "frontier", "pending", [("light", "pending"), ("frontier", "pending")]),
        ("after_call", "frontier", "ok"),
        ("after_step", "succeeded", 2),
    ]
    assert [row["state"] for row in ledger(project)] == ["settled", "settled"]


def test_a_refusing_hook_stops_the_request_and_releases_what_the_ledger_reserved(
    tmp_path: Any, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    from conftest import tiers_for

    project = Project(
        tmp_path / "p", {"tiers": tiers_for(ollama, frontier), "budget": {"daily_usd": 5}}
    )
    one_step(project, tier="frontier")

    class Refuse(Hooks):
        async def before_call(self, plan: StepPlan, call: Call) -> Call:
            assert call.reserved_usd is not None and call.reserved_usd > 0  # the budget's hold
            raise CallRefused("not during the freeze")

    result = run(project, [Refuse()])
    assert result.status == "failed"
    assert "not during the freeze" in (result.error or "")
    assert frontier.chat_requests() == []
    rows = ledger(project)
    assert [(row["outcome"], row["state"], row["cost_usd"]) for row in rows] == [
        ("budget_blocked", "settled", 0)
    ]
    assert_nothing_reserved(project)


def test_the_lowest_cap_of_the_hooks_wins(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    one_step(project, output=SCHEMA)
    ollama.reply("not json", "still not json")
    result = run(project, [Recorder(project, cap="frontier"), Recorder(project, cap="light")])
    assert result.status == "failed"
    assert {row["tier_used"] for row in ledger(project)} == {"light"}
    assert frontier.chat_requests() == []


def test_a_cancelled_step_is_still_told_to_after_step(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    from orchestrator.testing import Reply

    project.workflow(
        {
            "name": "one",
            "steps": [
                {"id": "slow", "agent": "helper", "tier": "light"},
                {
                    "id": "broken",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "{{ (inputs.text | length) // 0 }}",
                },
            ],
        }
    )
    ollama.reply(Reply(text="late", delay_s=5))
    recorder = Recorder(project)
    result = run(project, [recorder])
    assert result.status == "failed"
    ended = {event[1] for event in recorder.events if event[0] == "after_step"}
    assert ended == {"failed", "cancelled"}
    assert_nothing_reserved(project)


def test_a_locked_sqlite_database_never_blocks_the_event_loop(
    project: Project, ollama: OllamaServer
) -> None:
    """The ledger's writes try SQLite on the loop without waiting; while another
    connection holds the write lock they wait in a thread, and the loop runs on."""
    import sqlite3
    import threading
    import time

    one_step(project)
    ollama.reply("fine")
    runner, loaded, store = project.runner("one")
    database = str(project.root / "tierflow.db")
    locked, release = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:
        other = sqlite3.connect(database, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        other.execute("COMMIT")
        other.close()

    async def main() -> tuple[Any, float]:
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.05)  # the ticker is running
        threading.Timer(2.0, release.set).start()
        result = await runner.run(loaded, {})
        ticker.cancel()
        return result, max(gaps)

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    locked.wait(10)
    try:
        result, longest_gap = asyncio.run(main())
    finally:
        release.set()
        holder.join()
        store.engine.dispose()
    assert result.status == "succeeded", result.error
    # The lock was held for 2 s; a write that waited on the loop would have stalled it that long.
    assert longest_gap < 1.0
    assert [row["state"] for row in ledger(project)] == ["settled"]
