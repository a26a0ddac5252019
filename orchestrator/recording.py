"""The ledger and budgets of one run, as hooks (see ``orchestrator.hooks``).

Before each call, its worst case is reserved against every budget that limits
it and its pending row is written, in one transaction; when its step ends, the
step's record and the settlement of all its calls are written in another, and
any call left pending (cut off by a cancel) is abandoned at its worst case.
Every write is fenced by the run's lease. Once a workflow's own limits are
``downgrade_at`` used, its steps run no higher than ``downgrade_to``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal

from orchestrator import budgets, calibration, router
from orchestrator.calibration import Calibration
from orchestrator.encoding import usd
from orchestrator.hooks import CallRefused, Hooks
from orchestrator.ledger import Call, StepRecord, ToolRun
from orchestrator.settings import Settings
from orchestrator.spec import LoadedWorkflow, StepPlan
from orchestrator.store import Lease, Store
from orchestrator.store.counters import Limit
from orchestrator.storeio import off_loop, write


class LedgerHooks(Hooks):
    """Records the run held by ``lease``. ``status`` is the run's status as the
    last step's write saw it, so the executor sees a cancel before the next step.
    ``eval`` marks the rows as a ``tierflow eval`` run's; calibration reads only
    labels given before ``labels_before``, when set."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        workflow: LoadedWorkflow,
        lease: Lease,
        *,
        eval: bool = False,
        labels_before: datetime | None = None,
    ) -> None:
        self._settings = settings
        self._eval = eval
        self._labels_before = labels_before
        self._histories: dict[tuple[str, str], asyncio.Future[list[router.Outcome]]] = {}
        self._store = store
        self._workflow = workflow
        self._lease = lease
        self.status: str | None = None

    async def before_step(self, plan: StepPlan) -> str | None:
        budget = self._workflow.spec.budget
        if budget.downgrade_to is None or budget.downgrade_at is None:
            return None
        today = datetime.now(UTC).date()
        own = [limit for limit in self._limits(today) if limit.own]
        usage = await off_loop(lambda: self._store.usage([limit.key for limit in own]))
        shares = [sum(usage[limit.key]) / limit.usd for limit in own if limit.key in usage]
        used = max(shares, default=0)
        return budget.downgrade_to if used >= Decimal(str(budget.downgrade_at)) else None

    async def before_call(self, plan: StepPlan, call: Call) -> Call:
        """``call`` reserved and pending; ``CallRefused`` when a budget would be
        passed, ``LeaseLost`` when another executor holds the run."""
        limits = self._limits(call.created_at.astimezone(UTC).date())
        admitted = replace(call, reserved_usd=call.cost_usd if limits else None)
        workflow, lease = self._workflow, self._lease
        refused = await write(
            self._store,
            lambda: self._store.open_call(
                run_id=lease.run_id,
                workflow=workflow.name,
                content_hash=workflow.content_hash,
                agent=plan.agent.name,
                step_id=plan.id,
                call=admitted,
                limits=limits,
                lease=lease,
                eval=self._eval,
            ),
        )
        if refused is None:
            return admitted
        usage = await off_loop(lambda: self._store.usage([refused.key]))
        spent, reserved = usage.get(refused.key, (Decimal(0),) * 2)
        raise CallRefused(
            f"the {refused.label} of {usd(refused.usd)} would be passed:"
            f" {usd(spent)} spent, {usd(reserved)} reserved,"
            f" and this call may cost up to {usd(call.cost_usd)} on {call.model}"
        )

    async def before_tool(self, plan: StepPlan, run: ToolRun) -> ToolRun:
        """``run`` written as ``running`` before its tool runs, under the lease: a
        worker that dies in the tool leaves the row, and one that lost the run
        (``LeaseLost``) never runs the tool."""
        lease = self._lease
        found = await write(
            self._store,
            lambda: self._store.open_tool_call(
                run_id=lease.run_id, step_id=plan.id, run=run, lease=lease
            ),
        )
        return replace(run, id=found)

    async def after_step(self, plan: StepPlan, record: StepRecord) -> None:
        workflow, lease = self._workflow, self._lease
        self.status = await write(
            self._store,
            lambda: self._store.record_step(
                run_id=lease.run_id,
                workflow=workflow.name,
                content_hash=workflow.content_hash,
                record=record,
                lease=lease,
                eval=self._eval,
            ),
        )

    async def route(self, plan: StepPlan, key: str, ladder: list[str]) -> router.Route:
        """Where a ``tier: auto`` step starts, from its history (``orchestrator.router``).

        The history is read once per step of the run: the items of a ``for_each``
        step share it (their own rows are written when the step ends), and each
        item still draws its own exploration."""
        found = self._histories.get((plan.id, key))
        if found is None:
            found = self._histories[(plan.id, key)] = asyncio.ensure_future(
                self._history(plan, key)
            )
        history = await asyncio.shield(found)
        settings = self._settings.config.router
        return router.route(
            history,
            ladder,
            explore=settings.explore,
            latency_usd_per_s=settings.latency_usd_per_s,
        )

    async def _history(self, plan: StepPlan, key: str) -> list[router.Outcome]:
        rows = await off_loop(
            lambda: self._store.route_history(
                workflow=self._workflow.name, step_id=plan.id, route_key=key, limit=router.HISTORY
            )
        )
        return [
            router.Outcome(tier, outcome, float(cost), latency)
            for tier, outcome, cost, latency in rows
        ]

    async def calibration(self, plan: StepPlan, model: str, signal: str) -> Calibration | None:
        """The step's calibration on ``model`` for ``signal``, from its labels
        (``orchestrator.calibration``); None until it has enough."""
        workflow = self._workflow.name
        labelled = await off_loop(
            lambda: self._store.calibration_labels(
                workflow=workflow,
                step_id=plan.id,
                model=model,
                signal=signal,
                limit=calibration.HISTORY,
                before=self._labels_before,
            )
        )
        return calibration.fit(labelled)

    def _limits(self, day: date) -> list[Limit]:
        return budgets.limits(
            self._settings, self._workflow.name, self._workflow.spec.budget, self._lease.run_id, day
        )
