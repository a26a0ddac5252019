"""A step's tool loop: the model asks for tools, tierflow runs them and answers.

Every model turn is a ledger row (one that asked for tools has outcome
``tool_calls``); every tool call is a ``ToolRun`` of the step's record. See
``orchestrator.tools`` for how a tool is found, checked and run.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from orchestrator.errors import LeaseLost, StepFailed, clip, redact
from orchestrator.ledger import Call, StepRecord, ToolRun
from orchestrator.loading import suggest
from orchestrator.models.base import ToolCall
from orchestrator.settings import Tier
from orchestrator.spec import StepPlan
from orchestrator.tools import parse_arguments, run_tool


@dataclass(frozen=True)
class ToolRequest:
    """A model turn that asked for tools instead of answering (outcome ``tool_calls``)."""

    text: str
    calls: tuple[ToolCall, ...]


async def converse(
    plan: StepPlan,
    tier: Tier,
    messages: list[dict[str, Any]],
    record: StepRecord,
    turn: Callable[[list[dict[str, Any]]], Awaitable[tuple[Call, Any]]],
    personal: Callable[[list[dict[str, Any]]], list[str]],
    admit: Callable[[ToolRun], Awaitable[ToolRun]],
) -> tuple[Call, Any]:
    """A tool loop on one model: ask; run the tools it asks for and give it their
    results; ask again, up to the step's ``max_turns``. Every turn is a ledger
    row. An unknown tool, arguments that fail the tool's schema, or no answer
    within ``max_turns`` make the last turn ``invalid_output``; a tool's own
    failure goes back to the model once, and a second one is an ``error``.

    ``turn`` asks the model once with the messages so far and records the turn;
    ``personal`` finds personal data in messages (a result holding any never
    reaches a tier not marked local); ``admit`` writes a tool call ``running``
    before its tool runs (the hooks' ``before_tool``): if it cannot, the tool
    does not run."""
    tools = {tool.name: tool for tool in plan.tools}
    history = list(messages)
    failures = 0
    for number in range(1, plan.max_turns + 1):
        call, value = await turn(history)
        if call.outcome != "tool_calls":
            return call, value
        if number == plan.max_turns:
            break  # its tools would run for an answer nobody asks for
        asked: ToolRequest = value
        history.append(_assistant_turn(asked))
        for requested in asked.calls:
            tool = tools.get(requested.name)
            sent = _size(requested.arguments)
            problem = None
            if tool is None:
                problem = f"unknown tool {requested.name!r}{_among(requested.name, tools)}"
            else:
                try:
                    arguments = parse_arguments(tool, requested.arguments)
                except ValueError as exc:
                    problem = str(exc)
            pending = ToolRun(
                attempt=call.attempt,
                item_index=call.item_index,
                name=requested.name,
                outcome="running" if problem is None else "refused",
                duration_ms=0.0,
                arguments_bytes=sent,
                result_bytes=0,
                error=problem,
                created_at=datetime.now(UTC),
            )
            if problem is not None or tool is None:
                record.tools.append(pending)
                return _redo(record, call, "invalid_output", f"tool call: {problem}")
            try:
                pending = await admit(pending)
            except LeaseLost:
                raise  # another executor holds the run: its tools do not run from here
            except Exception as exc:  # the ledger is unreachable: no record, no tool
                why = redact(f"it could not be recorded: {type(exc).__name__}: {exc}")
                record.tools.append(replace(pending, outcome="refused", error=clip(why)))
                return _redo(record, call, "error", f"tool {tool.name} did not run: {why}")
            result = await run_tool(tool, arguments)
            record.tools.append(
                replace(
                    pending,
                    outcome=result.outcome,
                    duration_ms=result.duration_ms,
                    result_bytes=result.result_bytes,
                    error=result.error,
                )
            )
            if result.error is not None:
                failures += 1
                if failures > 1:
                    why = f"tool {tool.name} failed again: {result.error}"
                    return _redo(record, call, "error", why)
            held = personal([{"content": result.content}])
            if held and not tier.local:
                raise StepFailed(
                    f"tool {tool.name}'s result holds personal data ({', '.join(held)})"
                    " and this tier is not marked local: true; it was not sent"
                )
            history.append(
                {
                    "role": "tool",
                    "tool_call_id": requested.id,
                    "name": requested.name,
                    "content": result.content,
                }
            )
    why = f"no answer within max_turns {plan.max_turns}: the model kept calling tools"
    return _redo(record, call, "invalid_output", why)


def _redo(record: StepRecord, call: Call, outcome: str, error: str) -> tuple[Call, Any]:
    """``call``, the turn that ended the loop, with ``outcome``: in ``record`` too."""
    index = next(i for i, made in enumerate(record.calls) if made is call)
    record.calls[index] = replace(call, outcome=outcome, error=clip(error))
    return record.calls[index], None


def _assistant_turn(asked: ToolRequest) -> dict[str, Any]:
    """The model's tool-calling turn as the next request repeats it (OpenAI's shape)."""
    return {
        "role": "assistant",
        "content": asked.text,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": call.arguments
                    if isinstance(call.arguments, str)
                    else json.dumps(call.arguments),
                },
            }
            for call in asked.calls
        ],
    }


def _size(value: Any) -> int:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return len(text.encode())


def _among(name: str, tools: Mapping[str, Any]) -> str:
    return f"{suggest(name, tools)}; it may call {', '.join(tools)}"
