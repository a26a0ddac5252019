"""tierflow: YAML workflows on tiered models, with every call's cost in a SQL ledger.

    import orchestrator
    result = orchestrator.run("quickstart", {"topic": "tide pools"})
    result.status, result.outputs, result.cost_usd

    with orchestrator.Client(config="tierflow.yaml") as client:   # one per configuration
        run_id = client.enqueue("quickstart", {"topic": "reefs"})
        client.wait(run_id, timeout=60)

Importing this package is cheap; models, LangGraph and the database load when used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.errors import (
    LeaseLost,
    ModelError,
    RunCancelled,
    RunError,
    SpecError,
    StepFailed,
    TierflowError,
    UserError,
)

if TYPE_CHECKING:
    from orchestrator.client import Client
    from orchestrator.runner import RunResult

__all__ = [
    "Client",
    "LeaseLost",
    "ModelError",
    "RunCancelled",
    "RunError",
    "RunResult",
    "SpecError",
    "StepFailed",
    "TierflowError",
    "UserError",
    "arun",
    "enqueue",
    "get_run",
    "run",
]


def __getattr__(name: str) -> Any:
    # Client and RunResult bring the engine with them: loaded on first use.
    if name == "Client":
        from orchestrator.client import Client

        return Client
    if name == "RunResult":
        from orchestrator.runner import RunResult

        return RunResult
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")


def run(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> RunResult:
    """Run ``workflow`` (a name in workflows/ or a path) to the end and return its result.

    Raises ``UserError`` for a bad workflow, configuration or inputs before
    anything runs, and inside a running event loop (use ``arun`` there). A run
    that fails returns ``status == "failed"`` with ``error``.
    """
    from orchestrator.client import default_client

    return default_client(config).run(workflow, inputs)


async def arun(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> RunResult:
    """``run`` for callers already inside an event loop."""
    from orchestrator.client import default_client

    return await default_client(config).arun(workflow, inputs)


def enqueue(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> str:
    """Queue a run of ``workflow`` for a ``tierflow worker``; returns its run id at once."""
    from orchestrator.client import default_client

    return default_client(config).enqueue(workflow, inputs)


def get_run(run_id: str, *, config: str | None = None) -> dict[str, Any] | None:
    """The recorded run (status, inputs, outputs, steps, ledger rows), or None."""
    from orchestrator.client import default_client

    return default_client(config).get_run(run_id)
