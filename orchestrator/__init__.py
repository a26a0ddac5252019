"""tierflow: YAML workflows on tiered models, with every call's cost in a SQL ledger.

    import orchestrator
    result = orchestrator.run("quickstart", {"topic": "tide pools"})
    result.status, result.outputs, result.cost_usd

Importing this package is cheap; models, LangGraph and the database load when used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.runner import RunResult

__all__ = ["arun", "enqueue", "get_run", "run"]


def run(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> RunResult:
    """Run ``workflow`` (a name in workflows/ or a path) to the end and return its result.

    Raises ``UserError`` for a bad workflow, configuration or inputs before
    anything runs. A run that fails returns ``status == "failed"`` with ``error``.
    """
    return asyncio.run(arun(workflow, inputs, config=config))


async def arun(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> RunResult:
    """``run`` for callers already inside an event loop."""
    from orchestrator import runner

    return await runner.arun(workflow, inputs, config=config)


def enqueue(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> str:
    """Queue a run of ``workflow`` for a ``tierflow worker``; returns its run id at once."""
    from orchestrator import runner

    return runner.enqueue(workflow, inputs, config=config)


def get_run(run_id: str, *, config: str | None = None) -> dict[str, Any] | None:
    """The recorded run (status, inputs, outputs, steps, ledger rows), or None."""
    from orchestrator import runner

    return runner.get_run(run_id, config=config)
