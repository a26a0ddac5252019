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
import contextlib
import functools
import os
import re
import socket
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from orchestrator import tracing
from orchestrator.cache import Answers
from orchestrator.errors import LeaseLost, RunCancelled, RunError, StepFailed, UserError
from orchestrator.graph import OUTPUTS, compile_graph
from orchestrator.hooks import Hooks
from orchestrator.lease import LeaseKeeper
from orchestrator.ledger import Pricer, StepRecord
from orchestrator.loading import suggest
from orchestrator.models import Clients
from orchestrator.recording import LedgerHooks
from orchestrator.scheduler import (
    BACKSTOP_S,
    FAN_OUT_CONCURRENCY,
    NeedsApproval,
    NeedsTier,
    StepRunner,
    ladder,
)
from orchestrator.settings import Settings
from orchestrator.spec import LoadedWorkflow, StepPlan, dependents, project_path
from orchestrator.store import Checkpoint, Lease, Store
from orchestrator.store.runs import UNENDED, now
from orchestrator.storeio import off_loop, write
from orchestrator.templates import Expression, Template, TemplateProblem


@dataclass
class RunResult:
    run_id: str
    workflow: str
    # succeeded, failed, cancelled; queued when handed to another tier's queue;
    # waiting for a person's decision on an approval step
    status: str
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
        # Approval steps reached, each with how long it may wait (None: no limit).
        self.approvals: list[float | None] = []
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
        if self.approvals:  # a person decides first; a hand-off comes after
            raise _Waiting(self.approvals)
        raise _HandedOff(self.tiers[0])

    async def wait_for_approval(self, timeout_s: float | None) -> None:
        self.approvals.append(timeout_s)
        await self.wait()

    @property
    def leaving(self) -> bool:
        return bool(self.tiers or self.approvals)


class _Waiting(Exception):
    def __init__(self, timeouts: list[float | None]) -> None:
        limits = [limit for limit in timeouts if limit is not None]
        self.timeout_s = min(limits) if limits else None


class _Watch:
    """Why a run's work was cut off from inside the engine: its time limit."""

    timed_out: float | None = None

    def time_out(self, task: asyncio.Future[Any], limit: float) -> None:
        self.timed_out = limit
        task.cancel()


class Runner:
    """Runs workflows against one store. ``on_step`` is told of each step as it ends.

    ``tiers`` are the tiers this process serves; None (the default) serves all,
    and such a runner never hands a run off. ``hooks`` are told of every step
    and call, after the ledger's own (see ``orchestrator.hooks``). ``eval``
    marks its runs and their ledger rows as ``tierflow eval``'s;
    ``labels_before`` holds calibration to the labels given before it.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        clients: Clients | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        tiers: Collection[str] | None = None,
        hooks: Sequence[Hooks] = (),
        eval: bool = False,
        labels_before: datetime | None = None,
    ) -> None:
        self._settings = settings
        self._eval = eval
        self._labels_before = labels_before
        self._hooks = tuple(hooks)
        self._store = store
        self._owns_clients = clients is None
        self._clients = clients or Clients()
        self._pricer = Pricer(settings)
        self._on_step = on_step
        self._graphs: dict[str, Any] = {}  # compiled once per workflow content
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._tiers = tiers

    def create(
        self,
        workflow: LoadedWorkflow,
        inputs: Mapping[str, Any],
        *,
        queue: str | None = None,
        time_limit_s: float | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Record a new queued run, about to be published on ``queue``.

        Bad inputs or tags raise ``UserError`` before anything is written.
        """
        run_id, _ = self._create(
            workflow,
            workflow.resolve_inputs(inputs),
            status="queued",
            queue=queue,
            time_limit_s=time_limit_s,
            tags=checked_tags(tags),
        )
        return run_id

    def create_retry(
        self,
        workflow: LoadedWorkflow,
        retried: str,
        *,
        from_step: str | None = None,
        queue: str | None = None,
        time_limit_s: float | None = None,
    ) -> str:
        """Record a queued retry of run ``retried`` (see ``retry``), about to be published."""
        values, reuse, tags = self._retry_plan(workflow, retried, from_step)
        run_id, _ = self._create(
            workflow,
            values,
            status="queued",
            queue=queue,
            time_limit_s=time_limit_s,
            retry_of=retried,
            reuse=reuse,
            tags=tags,
        )
        return run_id

    async def retry(
        self,
        workflow: LoadedWorkflow,
        retried: str,
        *,
        from_step: str | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> RunResult:
        """A new run of ``workflow`` with run ``retried``'s inputs, linked to it, that
        takes every step that finished there (succeeded or skipped) as it was and
        runs the rest here. ``from_step`` runs that step and all that depend on it
        again too. ``UserError`` if the run is still active or the step unknown."""
        values, reuse, tags = await off_loop(lambda: self._retry_plan(workflow, retried, from_step))
        _, lease = await write(
            self._store,
            lambda: self._create(
                workflow,
                values,
                status="running",
                leased=True,
                retry_of=retried,
                reuse=reuse,
                tags=tags,
            ),
        )
        assert lease is not None
        checkpoint = await off_loop(lambda: self._store.prepare_resume(lease))
        return await self._leased(
            workflow, lease, values, checkpoint, on_step=on_step, eval=self._eval
        )

    def _retry_plan(
        self, workflow: LoadedWorkflow, retried: str, from_step: str | None
    ) -> tuple[dict[str, Any], list[str], dict[str, str] | None]:
        """The retried run's inputs, checked against the workflow as it is now, the
        steps the retry takes as they were, and its tags (the retry keeps them)."""
        row = self._store.run_row(retried)
        if row is None:
            raise UserError(f"no run {retried!r}")
        if row["workflow"] != workflow.name:
            raise UserError(f"run {retried} is of workflow {row['workflow']}, not {workflow.name}")
        if row["status"] in UNENDED:
            raise UserError(
                f"run {retried} is {row['status']}: retry a run once it has ended"
                " (tierflow cancel stops it)"
            )
        ids = [plan.id for plan in workflow.steps]
        again: set[str] = set()
        if from_step is not None:
            if from_step not in ids:
                raise UserError(
                    f"--from {from_step!r}: {workflow.name} has no such step{suggest(from_step, ids)}"
                )
            again = dependents(workflow, from_step)
        known = set(_step_names(workflow))
        reuse = [
            step
            for step in self._store.finished_steps(retried)
            if step in known and step.split(".", 1)[0] not in again
        ]
        return workflow.resolve_inputs(row["inputs"]), reuse, row["tags"]

    def _create(
        self,
        workflow: LoadedWorkflow,
        values: dict[str, Any],
        *,
        status: str,
        leased: bool = False,
        queue: str | None = None,
        time_limit_s: float | None = None,
        retry_of: str | None = None,
        reuse: Sequence[str] = (),
        tags: dict[str, str] | None = None,
    ) -> tuple[str, Lease | None]:
        run_id = uuid.uuid4().hex
        version = workflow.spec.version
        lease = self._store.create_run(
            run_id=run_id,
            workflow=workflow.name,
            version=None if version is None else str(version),
            content_hash=workflow.content_hash,
            inputs=values,
            path=project_path(workflow.path, self._settings),
            status=status,
            lease_owner=self._owner if leased else None,
            lease_ttl_s=self._settings.config.lease_ttl_s,
            queue=queue,
            time_limit_s=time_limit_s,
            eval=self._eval,
            retry_of=retry_of,
            reuse=reuse,
            tags=tags,
        )
        return run_id, lease

    async def run(
        self,
        workflow: LoadedWorkflow,
        inputs: Mapping[str, Any],
        *,
        on_step: Callable[[StepRecord], None] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunResult:
        """Record and run ``workflow`` here, to the end. Bad inputs or tags raise
        ``UserError`` first.

        ``on_step`` (else the runner's own) is told of each step as it ends.
        """
        values = workflow.resolve_inputs(inputs)
        chosen = checked_tags(tags)
        _, lease = await write(
            self._store,
            lambda: self._create(workflow, values, status="running", leased=True, tags=chosen),
        )
        assert lease is not None
        return await self._leased(
            workflow, lease, values, Checkpoint(), on_step=on_step, eval=self._eval
        )

    async def execute(
        self,
        workflow: LoadedWorkflow,
        run_id: str,
        *,
        time_limit_s: float | None = None,
        row: Mapping[str, Any] | None = None,
    ) -> RunResult | None:
        """Run (or resume) a recorded run, holding its lease while it runs.

        Returns None without doing anything when another live process holds the
        lease or the run has already finished: a duplicate delivery is harmless.
        Steps that finished before are not run again; their outputs are reused.
        Raises ``LeaseLost`` if another executor takes the run over meanwhile.
        Past ``time_limit_s`` its work is cut off and the run fails. ``row`` is
        the run's row (``Store.run_row``), when the caller has read it already.
        """
        ttl = self._settings.config.lease_ttl_s
        lease = await write(
            self._store, lambda: self._store.acquire_lease(run_id, owner=self._owner, ttl_s=ttl)
        )
        if lease is None:
            return None
        row = row or self._store.run_row(run_id)  # what it holds never changes
        assert row is not None
        if row["workflow_hash"] != workflow.content_hash:
            error = (
                f"{workflow.path}, its agents or the tiers it uses changed since run"
                f" {run_id} was recorded; start a new run"
            )
            self._store.finish_run(run_id, status="failed", error=error, lease=lease)
            return RunResult(
                run_id=run_id, workflow=workflow.name, status="failed", outputs={}, error=error
            )
        if lease.token == 1 and row["status"] == "queued" and row["retry_of"] is None:
            # Queued when read, and this is its first lease: nothing ran before
            # (a retry starts with the steps it reuses, which the resume reads).
            # (A run started before leases had tokens was "running", and resumes.)
            checkpoint = Checkpoint()
        else:
            checkpoint = await off_loop(lambda: self._store.prepare_resume(lease))
        # A run tierflow eval made stays marked, whoever resumes it.
        return await self._leased(
            workflow,
            lease,
            row["inputs"],
            checkpoint,
            time_limit_s=time_limit_s,
            eval=self._eval or bool(row.get("eval")),
        )

    async def aclose(self) -> None:
        """Close the model clients, inside the event loop that used them."""
        await self._clients.aclose()

    def fail(self, run_id: str, *, error: str) -> str | None:
        """End a run that cannot execute (its workflow no longer loads) as failed.

        Taken under the lease like any execution, so a live executor elsewhere
        is left alone (None); calls the run left pending are abandoned.
        """
        ttl = self._settings.config.lease_ttl_s
        lease = self._store.acquire_lease(run_id, owner=self._owner, ttl_s=ttl)
        if lease is None:
            return None
        return self._store.finish_run(run_id, status="failed", error=error, lease=lease)

    async def _leased(
        self,
        workflow: LoadedWorkflow,
        lease: Lease,
        values: dict[str, Any],
        checkpoint: Checkpoint,
        *,
        time_limit_s: float | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        eval: bool = False,
    ) -> RunResult:
        """Execute the run while a heartbeat keeps ``lease`` fresh.

        A cancel stops the run's work within a second, and so does passing
        ``time_limit_s`` (every call cut off is recorded abandoned); a lost
        lease stops it and raises ``LeaseLost``.
        """
        loop = asyncio.get_running_loop()
        work: list[asyncio.Future[RunResult]] = []
        keeper = LeaseKeeper(
            self._store,
            lease,
            ttl_s=self._settings.config.lease_ttl_s,
            on_stop=lambda: loop.call_soon_threadsafe(work[0].cancel),
        )
        watch = _Watch()
        with tracing.run_span(workflow.name, lease.run_id) as span:
            # Made inside the run's span, so the task's steps and calls are its children.
            task = asyncio.ensure_future(
                self._execute(
                    workflow,
                    lease,
                    values,
                    checkpoint,
                    keeper,
                    watch,
                    on_step or self._on_step,
                    eval,
                )
            )
            work.append(task)
            keeper.start()
            if time_limit_s is not None:
                limit = time_limit_s
                alarm = loop.call_later(limit, watch.time_out, task, limit)
                task.add_done_callback(lambda _: alarm.cancel())
            try:
                result = await task
                span.set_attribute("tierflow.status", result.status)
                return result
            except asyncio.CancelledError:
                if keeper.lost is not None:
                    raise LeaseLost(f"run {lease.run_id}: {keeper.lost}") from None
                raise
            finally:
                keeper.stop()
                if self._owns_clients:
                    await self._clients.aclose()

    async def _execute(
        self,
        workflow: LoadedWorkflow,
        lease: Lease,
        values: dict[str, Any],
        checkpoint: Checkpoint,
        keeper: LeaseKeeper,
        watch: _Watch,
        on_step: Callable[[StepRecord], None] | None,
        eval: bool,
    ) -> RunResult:
        run_id = lease.run_id
        done = checkpoint.done
        result = RunResult(run_id=run_id, workflow=workflow.name, status="running", outputs={})
        ledger = LedgerHooks(
            self._settings,
            self._store,
            workflow,
            lease,
            eval=eval,
            labels_before=self._labels_before,
        )
        steps = StepRunner(
            settings=self._settings,
            clients=self._clients,
            pricer=self._pricer,
            max_calls=workflow.spec.max_steps or self._settings.config.max_steps,
            hooks=(ledger, tracing.SpanHooks(), *self._hooks),
            checkpoint=checkpoint,
            tiers=self._tiers,
            router=ledger.route,
            calibrations=ledger.calibration,
            answers=Answers(self._store, workflow.name, secrets=self._settings.key_names),
            decisions=lambda plan: off_loop(lambda: self._store.decision(run_id, plan.id)),
        )
        run_info = {"id": run_id, "workflow": workflow.name}
        gate = _HandOffGate()
        cancelled = False  # seen in a step's record; the keeper's own flag may lag

        async def step_of(
            inputs: dict[str, Any], prefix: str, plan: StepPlan, outputs: dict[str, Any]
        ) -> Any:
            """Run ``plan`` of the workflow whose steps are named from ``prefix``:
            "" for this run's own, "STEP." for those of a workflow that STEP uses."""
            nonlocal cancelled
            if prefix:  # recorded under its own name in this run: "STEP.CHILD_STEP"
                plan = replace(plan, step=plan.step.model_copy(update={"id": prefix + plan.id}))
            if plan.id in done:  # finished before this process took the run over
                return done[plan.id]
            if cancelled or keeper.cancelled:
                raise RunCancelled(f"run {run_id} was cancelled before step '{plan.id}'")
            if gate.leaving:  # the run is leaving this worker: start nothing new
                await gate.wait()
            context = {
                "inputs": inputs,
                "steps": {step_id: {"output": output} for step_id, output in outputs.items()},
                "run": run_info,
            }
            if plan.child is not None:
                return await uses(plan, context)
            record = steps.start(plan)
            needs: NeedsTier | None = None
            approval: NeedsApproval | None = None
            with gate.running():
                try:
                    await steps.run(plan, context, record)  # its hooks record it
                except NeedsTier as exc:
                    needs = exc
                except NeedsApproval as exc:
                    approval = exc
                finally:
                    cancelled = cancelled or ledger.status == "cancelled"
                    result.steps.append(record)
            if on_step is not None and approval is not None:
                on_step(record)
            if approval is not None:
                await gate.wait_for_approval(approval.timeout_s)
            if needs is not None:
                await gate.wait(needs.tier)
            if on_step is not None:
                on_step(record)
            if record.status == "failed":
                raise StepFailed(f"step '{plan.id}' failed: {record.error}")
            return record.output

        async def uses(plan: StepPlan, context: dict[str, Any]) -> Any:
            """A uses: step: the other workflow's steps run in this run, named
            "STEP.CHILD_STEP", so their calls count here (budgets, spend, show);
            the step's output is that workflow's outputs."""
            assert plan.child is not None
            child = plan.child
            record = steps.start(plan)
            if plan.when is not None and not plan.when.evaluate(context):
                record.status = "skipped"
            else:
                try:
                    given = {name: _given(value, context) for name, value in plan.child_inputs}
                    inputs = child.resolve_inputs(given)
                    state = await self._graph(child).ainvoke(
                        {OUTPUTS: {}},
                        config={
                            "recursion_limit": len(child.steps) + 2,
                            "configurable": {
                                "run_step": functools.partial(step_of, inputs, f"{plan.id}.")
                            },
                        },
                    )
                    record.output, record.status = state[OUTPUTS], "succeeded"
                except (UserError, TemplateProblem, StepFailed) as exc:
                    record.status, record.error = "failed", f"workflow {child.name}: {exc}"
            record.finished_at = datetime.now(UTC)
            for hook in (ledger, *self._hooks):
                await hook.after_step(plan, record)
            result.steps.append(record)
            if on_step is not None:
                on_step(record)
            if record.status == "failed":
                raise StepFailed(f"step '{plan.id}' failed: {record.error}")
            return record.output

        run_step = functools.partial(step_of, values, "")
        graph = self._graph(workflow)
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
        except _Waiting as exc:
            until = None if exc.timeout_s is None else now() + timedelta(seconds=exc.timeout_s)
            if await off_loop(lambda: self._store.wait(lease, until=until)):
                result.status = "waiting"
                return result
            result.status, result.error = "cancelled", f"run {run_id} was cancelled"
        except _HandedOff as exc:
            queue = self._settings.queue_of(exc.tier)
            if await off_loop(lambda: self._store.hand_off(lease, queue=queue)):
                result.status, result.queue = "queued", queue
                return result
            result.status, result.error = "cancelled", f"run {run_id} was cancelled"
        except RunError as exc:
            result.status = "cancelled" if isinstance(exc, RunCancelled) else "failed"
            result.error = str(exc)
        except LeaseLost:
            raise  # another executor owns the run: write nothing more
        except asyncio.CancelledError:
            if keeper.lost is None and watch.timed_out is not None:
                result.status = "failed"
                result.error = (
                    f"the run passed its time limit of {watch.timed_out:g}s;"
                    " the calls in flight were cut off"
                )
            elif keeper.lost is None and keeper.cancelled:
                result.status, result.error = "cancelled", f"run {run_id} was cancelled mid-step"
            else:
                await self._interrupted(lease, "CancelledError", keeper)
                raise
        except BaseException as exc:
            await self._interrupted(lease, type(exc).__name__, keeper)
            raise
        if result.status != "succeeded":
            result.outputs = {
                **done,
                **{s.step_id: s.output for s in result.steps if s.status == "succeeded"},
            }
        final = await write(
            self._store,
            lambda: self._store.finish_run(
                run_id,
                status=result.status,
                outputs=result.outputs,
                error=result.error,
                lease=lease,
            ),
        )
        if final == "cancelled" and result.status != "cancelled":
            # Cancelled during the last step: the run stays cancelled.
            result.status, result.error = "cancelled", f"run {run_id} was cancelled"
        return result

    def _graph(self, workflow: LoadedWorkflow) -> Any:
        """The workflow's compiled graph, compiled once per content."""
        graph = self._graphs.get(workflow.content_hash)
        if graph is None:
            graph = self._graphs[workflow.content_hash] = compile_graph(workflow)
        return graph

    async def _interrupted(self, lease: Lease, why: str, keeper: LeaseKeeper) -> None:
        """The run's work was cut off from outside: end it failed, unless it is not ours."""
        if keeper.lost is not None:
            return
        with contextlib.suppress(LeaseLost):
            await off_loop(
                lambda: self._store.finish_run(
                    lease.run_id, status="failed", error=f"interrupted: {why}", lease=lease
                )
            )


def _step_names(workflow: LoadedWorkflow, prefix: str = "") -> list[str]:
    """Every step a run of ``workflow`` records: its own, and ``STEP.CHILD`` for the
    steps of the workflows its ``uses:`` steps run."""
    names = []
    for plan in workflow.steps:
        names.append(prefix + plan.id)
        if plan.child is not None:
            names += _step_names(plan.child, f"{prefix}{plan.id}.")
    return names


def _given(value: Any, context: dict[str, Any]) -> Any:
    """A ``with`` value for a sub-workflow's input: rendered, evaluated, or as written."""
    if isinstance(value, Template):
        return value.render(context)
    if isinstance(value, Expression):
        return value.evaluate(context)
    return value


# Besides each call's own timeout: store I/O, rendering and checks, per call,
# and the waits of retries on the same model (429, 5xx), per attempt.
PER_CALL_SLACK_S = 15.0
RUN_SLACK_S = 30.0


TAG_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,39}$")
MAX_TAGS = 20
MAX_TAG_VALUE = 100


def checked_tags(tags: Mapping[str, Any] | None) -> dict[str, str] | None:
    """A run's tags as given, checked: at most 20, keys like ``team`` (lower case,
    up to 40 characters), values strings of up to 100; ``UserError`` saying which is wrong."""
    if not tags:
        return None
    if len(tags) > MAX_TAGS:
        raise UserError(f"{len(tags)} tags: a run takes at most {MAX_TAGS}")
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise UserError(
                f"tag {key!r}: a tag's name is lower case letters, digits, '_', '.' or '-',"
                " starting with a letter, at most 40 characters"
            )
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            raise UserError(
                f"tag {key}: its value must be text of at most {MAX_TAG_VALUE} characters"
            )
    return dict(tags)


def time_limit_s(settings: Settings, workflow: LoadedWorkflow) -> float:
    """The longest a run of ``workflow`` can legitimately take, steps one after another.

    Each step uses every attempt at its slowest model (its own ``timeout_s``
    where it sets one), each attempt every sample of a ``consistency`` signal. A ``for_each`` step runs in waves of
    ``FAN_OUT_CONCURRENCY`` items, and its list can hold up to the run's
    ``max_steps`` units, since its size is known only when it runs.
    """
    attempts = settings.config.escalation.max_attempts
    units = workflow.spec.max_steps or settings.config.max_steps
    total = RUN_SLACK_S
    for plan in workflow.steps:
        if plan.child is not None:  # its steps run one after another, as these do
            total += time_limit_s(settings, plan.child) - RUN_SLACK_S
            continue
        climb = ladder(settings, plan)
        slowest = max((entry.timeout_s for _, tier in climb for entry in tier.models), default=0)
        per_call = (plan.step.timeout_s or slowest) + BACKSTOP_S + PER_CALL_SLACK_S
        waves = -(-units // FAN_OUT_CONCURRENCY) if plan.for_each is not None else 1
        confidence = plan.confidence
        samples = confidence.samples if confidence and confidence.signal == "consistency" else 1
        # A tool loop: each turn is a call, and may wait on every tool's timeout.
        turns = plan.max_turns if plan.tools else 1
        tools = sum(tool.timeout_s for tool in plan.tools)
        total += waves * attempts * samples * turns * (per_call + tools)
    return total
