"""What runs around each step and model call, in the spirit of dramatiq's middleware.

A ``StepRunner`` tells each of its hooks, in order:

    before_step(plan)         the highest tier the step may use now, or None
    before_call(plan, call)   the call as admitted, before its request; or CallRefused
    after_call(plan, call)    each request as it ended, in memory
    before_tool(plan, run)    each tool call as admitted, before the tool runs
    after_step(plan, record)  the step as it ended, with every call it made

``before_call`` sees the call's worst case (``outcome == "pending"``) and
returns it as admitted, with the amount it holds against budgets in
``reserved_usd``; the next hook gets that. A ``CallRefused``, or any error
other than ``LeaseLost``, stops the call before its request: fail closed.
``before_tool`` sees a tool call before the tool runs; an error from it
stops the tool (``LeaseLost`` ends the step, any other refuses the call).
``after_step`` runs for every step that started (succeeded, failed, skipped,
cancelled or handed off), so calls already made are always recorded; its
error ends the run. With several hooks, the lowest cap wins.

The ledger (pending, settle, abandon) and budgets (reserve, settle,
downgrade) are one hook, ``runner.LedgerHooks``: a call's reservation and
its pending row are one transaction, and so are its settlement and its step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.ledger import Call, StepRecord, ToolRun
    from orchestrator.spec import StepPlan


class CallRefused(Exception):
    """A hook refused a call before its request; the step fails with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Hooks:
    """A hook that does nothing; override the methods you need."""

    async def before_step(self, plan: StepPlan) -> str | None:
        """The highest tier ``plan`` may use now, or None for no cap."""
        return None

    async def before_call(self, plan: StepPlan, call: Call) -> Call:
        """``call`` as admitted; raise ``CallRefused`` to stop it."""
        return call

    async def after_call(self, plan: StepPlan, call: Call) -> None:
        """Told of each request as it ended (ok, error, timeout, ...)."""

    async def before_tool(self, plan: StepPlan, run: ToolRun) -> ToolRun:
        """``run`` (outcome ``running``) as admitted, before its tool runs."""
        return run

    async def after_step(self, plan: StepPlan, record: StepRecord) -> None:
        """Told of each step as it ended."""
