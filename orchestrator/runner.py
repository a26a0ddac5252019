"""A whole run: record it, compile the graph, run its steps, record each as it ends.

``tierflow run``, the Python API and queue workers all run steps through
``Runner._execute``. The executor holds the run's lease. Each call is written
pending before its request, and each step's result is written with its settled
calls in one transaction when the step ends. A run whose process died resumes
from its finished steps.

A queue worker may serve only some tiers. When a step needs another tier, the
steps still running here finish, the run goes back to the queue of that tier
(status queued, lease dropped), and the worker that takes it resumes it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from orchestrator import budgets
from orchestrator.errors import RunCancelled, RunError, StepFailed
from orchestrator.graph import OUTPUTS, compile_graph
from orchestrator.ledger import Call, Pricer, StepRecord
from orchestrator.models import Clients
from orchestrator.scheduler import NeedsTier, StepRunner
from orchestrator.settings import Settings
from orchestrator.spec import LoadedWorkflow, StepPlan
from orchestrator.store import Store


@dataclass
class RunResult:
    run_id: str
    workflow: str
    status: str  # succeeded, failed, cancelled, or queued when handed to another tier's queue
    outputs: dict[str, Any]
    error: str | None = None
    queue: str | None = None  # where a handed-off run waits now
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def cost_usd(self) -> Decimal:
        return sum((step.cost_usd for step in self.steps), Decimal(0))


class _HandedOff(Exception):
    def __init__(self, tier: str) -> None:
        self.tier = tier


class _HandOffGate:
    """Where steps wait once one of them needs a tier this process does not serve.

    Steps already running finish first (cancelling them would waste paid
    calls); steps not yet started do not start. When none is running, each
    waiting step raises ``_HandedOff`` for the first tier asked for.
    """

    def __init__(self) -> None:
        self.tiers: list[str] = []
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def running(self) -> Iterator[None]:
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def wait(self, tier: str | None = None) -> None:
        if tier is not None:
            self.tiers.append(tier)
        await self._idle.wait()
        raise _HandedOff(self.tiers[0])


class Runner:
    """Runs workflows against one store. ``on_step`` is told of each step as it ends.

    ``tiers`` are the tiers this process serves; None (the default) serves all,
    and such a runner never hands a run off.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        clients: Clients | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        tiers: Collection[str] | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._owns_clients = clients is None
        self._clients = clients or Clients()
        self._pricer = Pricer(settings)
        self._on_step = on_step
        self._graphs: dict[str, Any] = {}  # compiled once per workflow content
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._cancelled: set[str] = set()
        self._tiers = tiers

    def create(
        self,
        workflow: LoadedWorkflow,
        inputs: Mapping[str, Any],
        *,
        queue: str | None = None,
        time_limit_s: float | None = None,
    ) -> str:
        """Record a new queued run, about to be published on ``queue``.

        Bad inputs raise ``UserError`` before anything is written.
        """
        return self._create(
            workflow,
            workflow.resolve_inputs(inputs),
            status="queued",
            queue=queue,
            time_limit_s=time_limit_s,
        )

    def _create(
        self,
        workflow: LoadedWorkflow,
        values: dict[str, Any],
        *,
        status: str,
        leased: bool = False,
        queue: str | None = None,
        time_limit_s: float | None = None,
    ) -> str:
        run_id = uuid.uuid4().hex
        version = workflow.spec.version
        self._store.create_run(
            run_id=run_id,
            workflow=workflow.name,
            version=None if version is None else str(version),
            content_hash=workflow.content_hash,
            inputs=values,
            path=str(workflow.path.resolve()),
            status=status,
            lease_owner=self._owner if leased else None,
            lease_ttl_s=self._settings.config.lease_ttl_s,
            queue=queue,
            time_limit_s=time_limit_s,
        )
        return run_id

    async def run(self, workflow: LoadedWorkflow, inputs: Mapping[str, Any]) -> RunResult:
        """Record and run ``workflow`` here, to the end. Bad inputs raise ``UserError`` first."""
        values = workflow.resolve_inputs(inputs)
        run_id = self._create(workflow, values, status="running", leased=True)
        return await self._leased(self._execute(workflow, run_id, values, {}, {}, {}), run_id)

    async def execute(self, workflow: LoadedWorkflow, run_id: str) -> RunResult | None:
        """Run (or resume) a recorded run, holding its lease while it runs.

        Returns None without doing anything when another live process holds the
        lease or the run has already finished: a duplicate delivery is harmless.
        Steps that finished before are not run again; their outputs are reused.
        """
        ttl = self._settings.config.lease_ttl_s
        if not self._store.acquire_lease(run_id, owner=self._owner, ttl_s=ttl):
            return None
        row = self._store.run_row(run_id)
        assert row is not None
        if row["workflow_hash"] != workflow.content_hash:
            error = f"{workflow.path} changed since run {run_id} was queued"
            self._store.finish_run(run_id, status="failed", error=error)
            return RunResult(
                run_id=run_id, workflow=workflow.name, status="failed", outputs={}, error=error
            )
        done, last_attempts, handed_on = self._store.prepare_resume(run_id)
        return await self._leased(
            self._execute(workflow, run_id, row["inputs"], done, last_attempts, handed_on), run_id
        )

    async def _leased(self, work: Coroutine[Any, Any, RunResult], run_id: str) -> RunResult:
        """Await ``work`` while a heartbeat keeps this process's lease on the run fresh.

        If the lease is lost (this process stalled past the TTL and another
        worker took the run over), the work is cancelled: one run, one executor.
        """
        task = asyncio.ensure_future(work)
        heartbeat = asyncio.create_task(
            self._keep_lease(run_id, self._settings.config.lease_ttl_s, task)
        )
        try:
            return await task
        finally:
            heartbeat.cancel()
            if self._owns_clients:
                await self._clients.aclose()

    async def _keep_lease(self, run_id: str, ttl: float, work: asyncio.Future[Any]) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            status = self._store.renew_lease(run_id, owner=self._owner, ttl_s=ttl)
            if status is None:
                work.cancel()
                return
            if status == "cancelled":
                self._cancelled.add(run_id)  # the run stops before its next step

    def _reserve(
        self, workflow: LoadedWorkflow, run_id: str, plan: StepPlan, call: Call
    ) -> str | None:
        """Reserve ``call`` against the budgets and write it pending; why not, if refused."""
        day = call.created_at.astimezone(UTC).date()
        limits = budgets.limits(self._settings, workflow, run_id, day)
        refused = self._store.open_call(
            run_id=run_id,
            workflow=workflow.name,
            content_hash=workflow.content_hash,
            agent=plan.agent.name,
            step_id=plan.id,
            call=call,
            limits=limits,
        )
        if refused is None:
            return None
        spent, reserved = self._store.usage([refused.key]).get(refused.key, (Decimal(0),) * 2)
        return (
            f"the {refused.label} of {_usd(refused.usd)} would be passed:"
            f" {_usd(spent)} spent, {_usd(reserved)} reserved,"
            f" and this call may cost up to {_usd(call.cost_usd)} on {call.model}"
        )

    def _tier_cap(self, workflow: LoadedWorkflow, run_id: str) -> str | None:
        """The budget's ``downgrade_to`` once any of the workflow's own limits is
        ``downgrade_at`` used (spent plus reserved), else None."""
        budget = workflow.spec.budget
        if budget.downgrade_to is None or budget.downgrade_at is None:
            return None
        today = datetime.now(UTC).date()
        own = [
            limit for limit in budgets.limits(self._settings, workflow, run_id, today) if limit.own
        ]
        usage = self._store.usage([limit.key for limit in own])
        shares = [sum(usage[limit.key]) / limit.usd for limit in own if limit.key in usage]
        return (
            budget.downgrade_to
            if max(shares, default=0) >= Decimal(str(budget.downgrade_at))
            else None
        )

    async def _execute(
        self,
        workflow: LoadedWorkflow,
        run_id: str,
        values: dict[str, Any],
        done: dict[str, Any],
        last_attempts: dict[str, int],
        handed_on: dict[str, dict[str, Any]],
    ) -> RunResult:
        result = RunResult(run_id=run_id, workflow=workflow.name, status="running", outputs={})
        steps = StepRunner(
            settings=self._settings,
            clients=self._clients,
            pricer=self._pricer,
            max_calls=workflow.spec.max_steps or self._settings.config.max_steps,
            on_call_start=lambda plan, call: self._reserve(workflow, run_id, plan, call),
            last_attempts=last_attempts,
            tiers=self._tiers,
            handed_on=handed_on,
            tier_cap=lambda plan: self._tier_cap(workflow, run_id),
            budgeted=bool(
                budgets.limits(self._settings, workflow, run_id, datetime.now(UTC).date())
            ),
        )
        run_info = {"id": run_id, "workflow": workflow.name}
        gate = _HandOffGate()

        async def run_step(plan: StepPlan, outputs: dict[str, Any]) -> Any:
            if plan.id in done:  # finished before this process took the run over
                return done[plan.id]
            if run_id in self._cancelled:
                raise RunCancelled(f"run {run_id} was cancelled before step '{plan.id}'")
            if gate.tiers:  # the run is leaving this worker: start nothing new
                await gate.wait()
            context = {
                "inputs": values,
                "steps": {step_id: {"output": output} for step_id, output in outputs.items()},
                "run": run_info,
            }
            record = steps.start(plan)
            needs: NeedsTier | None = None
            with gate.running():
                try:
                    await steps.run(plan, context, record)
                except NeedsTier as exc:
                    needs = exc
                finally:  # a cancelled step still has its calls written
                    status = self._store.record_step(
                        run_id=run_id,
                        workflow=workflow.name,
                        content_hash=workflow.content_hash,
                        record=record,
                    )
                    if status == "cancelled":
                        self._cancelled.add(run_id)
                    result.steps.append(record)
            if needs is not None:
                await gate.wait(needs.tier)
            if self._on_step is not None:
                self._on_step(record)
            if record.status == "failed":
                raise StepFailed(f"step '{plan.id}' failed: {record.error}")
            return record.output

        graph = self._graphs.get(workflow.content_hash)
        if graph is None:
            graph = self._graphs[workflow.content_hash] = compile_graph(workflow)
        try:
            state = await graph.ainvoke(
                {OUTPUTS: {}},
                config={
                    "recursion_limit": len(workflow.steps) + 2,
                    "configurable": {"run_step": run_step},
                },
            )
            result.outputs = state[OUTPUTS]
            result.status = "succeeded"
        except _HandedOff as exc:
            queue = self._settings.queue_of(exc.tier)
            if self._store.hand_off(run_id, owner=self._owner, queue=queue):
                result.status, result.queue = "queued", queue
            else:  # cancelled meanwhile, or this process lost its lease
                row = self._store.run_row(run_id)
                result.status = row["status"] if row else "failed"
            return result
        except RunError as exc:
            result.status = "cancelled" if isinstance(exc, RunCancelled) else "failed"
            result.error = str(exc)
            result.outputs = {
                **done,
                **{s.step_id: s.output for s in result.steps if s.status == "succeeded"},
            }
        except BaseException as exc:
            self._store.finish_run(
                run_id,
                status="failed",
                error=f"interrupted: {type(exc).__name__}",
                owner=self._owner,
            )
            raise
        self._store.finish_run(
            run_id,
            status=result.status,
            outputs=result.outputs,
            error=result.error,
            owner=self._owner,
        )
        return result


def _usd(amount: Decimal) -> str:
    return f"${amount:.6f}".rstrip("0").rstrip(".")


def open_store(settings: Settings) -> Store:
    """The store for ``settings``; a SQLite database is migrated on first use."""
    from orchestrator.store import open_engine

    url = settings.database_url
    return Store(open_engine(url, migrate=url.startswith("sqlite")))


class Enqueuer:
    """Records queued runs and publishes them, keeping its store, broker connection
    and loaded workflows from one run to the next. ``close`` releases them."""

    def __init__(self, settings: Settings) -> None:
        from orchestrator.queue import make_app
        from orchestrator.spec import WorkflowCache

        self.settings = settings
        self.workflows = WorkflowCache(settings)
        self._store = open_store(settings)
        self._app = make_app(settings)

    def enqueue(self, workflow: LoadedWorkflow, inputs: Mapping[str, Any]) -> str:
        """Record a queued run and publish it; a broker that refuses fails the run."""
        from orchestrator.queue import enqueue_run, first_queue, time_limit_s

        settings = self.settings
        queue, limit = first_queue(settings, workflow), time_limit_s(settings, len(workflow.steps))
        run_id = Runner(settings=settings, store=self._store).create(
            workflow, inputs, queue=queue, time_limit_s=limit
        )
        try:
            enqueue_run(self._app, run_id, queue=queue, time_limit_s=limit)
        except RunError as exc:
            self._store.finish_run(run_id, status="failed", error=str(exc))
            raise
        return run_id

    def close(self) -> None:
        self._app.close()  # the producer pool's connection
        self._store.engine.dispose()


_enqueuers: dict[tuple[Any, ...], Enqueuer] = {}


def enqueue(
    workflow: str, inputs: Mapping[str, Any] | None = None, *, config: str | None = None
) -> str:
    """Record a queued run of ``workflow`` and publish it for a worker; returns the run id.

    Repeated calls in one process reuse one ``Enqueuer`` per configuration
    (made again if the file or TIERFLOW_* variables change).
    """
    from orchestrator.settings import find_config_path, load_settings
    from orchestrator.spec import find_workflow

    path = find_config_path(config)
    key = (
        None if path is None else (str(path.resolve()), path.stat().st_mtime_ns),
        Path.cwd() if path is None else None,
        *(os.environ.get(name) for name in ("TIERFLOW_DATABASE_URL", "TIERFLOW_BROKER_URL")),
    )
    enqueuer = _enqueuers.get(key)
    if enqueuer is None:
        enqueuer = _enqueuers[key] = Enqueuer(load_settings(config))
    loaded = enqueuer.workflows.load(find_workflow(workflow, enqueuer.settings))
    return enqueuer.enqueue(loaded, inputs or {})


def enqueue_loaded(settings: Settings, workflow: LoadedWorkflow, inputs: Mapping[str, Any]) -> str:
    """Enqueue one run of a workflow already loaded, with connections made for it alone."""
    enqueuer = Enqueuer(settings)
    try:
        return enqueuer.enqueue(workflow, inputs)
    finally:
        enqueuer.close()


def get_run(run_id: str, *, config: str | None = None) -> dict[str, Any] | None:
    """A run with its steps and ledger rows, as ``tierflow show --json`` prints it."""
    from orchestrator.settings import load_settings

    store = open_store(load_settings(config))
    try:
        return store.run(run_id)
    finally:
        store.engine.dispose()


async def arun(
    workflow: str,
    inputs: Mapping[str, Any] | None = None,
    *,
    config: str | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> RunResult:
    """Load ``workflow`` (a name or a path), run it and record it. See ``orchestrator.run``."""
    from orchestrator.settings import load_settings
    from orchestrator.spec import find_workflow, load_workflow

    settings = load_settings(config)
    loaded = load_workflow(find_workflow(workflow, settings), settings)
    store = open_store(settings)
    try:
        return await Runner(settings=settings, store=store, on_step=on_step).run(
            loaded, inputs or {}
        )
    finally:
        store.engine.dispose()
