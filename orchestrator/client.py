"""``Client``: one configuration's store, model clients, workflows and broker, opened once.

    with orchestrator.Client(config="tierflow.yaml") as client:
        result = client.run("quickstart", {"topic": "tide pools"})
        run_id = client.enqueue("quickstart", {"topic": "reefs"})
        client.wait(run_id, timeout=60)

A client is built once per configuration and reused, as an ``httpx.Client`` is:
nothing re-reads tierflow.yaml or opens an engine per call, each workflow's
graph is compiled once, and workflow and agent files are read again only when
they change. ``orchestrator.run`` and friends use a default client per
configuration. A client is meant for one thread; its ``arun`` may run many runs
at once on one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from orchestrator.errors import RunError, UserError

if TYPE_CHECKING:
    from orchestrator.ledger import StepRecord
    from orchestrator.reports import SpendRow
    from orchestrator.runner import Runner, RunResult
    from orchestrator.settings import Settings
    from orchestrator.spec import LoadedWorkflow
    from orchestrator.store import Store

ENDED = ("succeeded", "failed", "cancelled")
log = logging.getLogger("tierflow.queue")  # what it says of runs it executes for a worker


class Client:
    """Runs, queues and reads runs of one configuration. Close it, or use ``with``.

    ``config`` is a tierflow.yaml path (else ``$TIERFLOW_CONFIG``, else the
    nearest one); ``settings`` may be given instead, already loaded. With
    ``tiers``, runs here use only those tiers and are handed to another
    tier's queue when a step needs it (a queue worker's client).
    """

    def __init__(
        self,
        config: str | Path | None = None,
        *,
        settings: Settings | None = None,
        tiers: list[str] | None = None,
    ):
        from orchestrator.settings import load_settings
        from orchestrator.spec import WorkflowCache

        self.settings = settings if settings is not None else load_settings(config)
        self._tiers = tiers  # the tiers its runs may use here (None: all); a worker's --tiers
        self._workflows = WorkflowCache(self.settings)
        self._store: Store | None = None
        self._app: Any = None  # the Celery app, made on the first enqueue
        self._bound: tuple[asyncio.AbstractEventLoop, Runner] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s own loop

    @property
    def store(self) -> Store:
        if self._store is None:
            from orchestrator.store import open_store

            self._store = open_store(self.settings)
        return self._store

    def load(self, workflow: str | Path) -> LoadedWorkflow:
        """The checked workflow (a name in workflows/ or a path); ``SpecError`` if it is not."""
        from orchestrator.spec import find_workflow

        return self._workflows.load(find_workflow(str(workflow), self.settings))

    async def arun(
        self,
        workflow: str | Path,
        inputs: Mapping[str, Any] | None = None,
        *,
        on_step: Callable[[StepRecord], None] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunResult:
        """Record and run ``workflow`` here to its end. Bad inputs raise ``UserError``
        before anything is written; a run that fails returns ``status == "failed"``.
        ``tags`` ({"team": "growth"}) are the run's, for spend to group and filter by."""
        loaded = self.load(workflow)
        return await self._runner().run(loaded, inputs or {}, on_step=on_step, tags=tags)

    def run(
        self,
        workflow: str | Path,
        inputs: Mapping[str, Any] | None = None,
        *,
        on_step: Callable[[StepRecord], None] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> RunResult:
        """``arun`` for code that is not inside an event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise UserError(
                "Client.run() was called inside a running event loop: use 'await client.arun(...)'"
            )
        return self._own_loop().run_until_complete(
            self.arun(workflow, inputs, on_step=on_step, tags=tags)
        )

    def _own_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def _celery(self) -> Any:
        from orchestrator.queue import make_app

        if self._app is None:
            self._app = make_app(self.settings)
        return self._app

    def _runner(self) -> Runner:
        """The runner of the running loop: model clients belong to one loop."""
        from orchestrator.models import Clients
        from orchestrator.runner import Runner

        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound[0] is not loop:
            runner = Runner(
                settings=self.settings, store=self.store, clients=Clients(), tiers=self._tiers
            )
            self._bound = (loop, runner)
        return self._bound[1]

    def execute(self, run_id: str, *, app: Any = None) -> str:
        """Execute a recorded run here, as a queue worker does with a message; what became of it.

        Returns the run's status (``succeeded``, ``failed``, ``cancelled``, or
        ``queued`` when it was handed to another tier's queue, published through
        ``app``, else the client's own Celery app), or why nothing ran:
        ``skipped`` (another live executor holds it), ``lease-lost`` (another
        executor took it over meanwhile), ``unknown`` (no such run). A run that
        already ended keeps its status. Nothing a run leaves on the client's
        loop survives into the next.
        """
        from orchestrator.errors import LeaseLost, TierflowError
        from orchestrator.queue import drain, publish
        from orchestrator.store.runs import ACTIVE

        row = self.store.run_row(run_id)
        if row is None:
            log.warning("run %s: no such run", run_id)
            return "unknown"
        if row["status"] not in ACTIVE:
            return str(row["status"])
        try:
            workflow = self._workflows.load(self.settings.root / row["workflow_path"])
        except TierflowError as exc:  # the file went away or broke after the run was queued
            return self._plain_runner().fail(run_id, error=str(exc)) or "skipped"
        loop = self._own_loop()

        async def execute() -> RunResult | None:
            runner = self._runner()
            return await runner.execute(workflow, run_id, time_limit_s=row["time_limit_s"], row=row)

        try:
            result = loop.run_until_complete(execute())
        except LeaseLost as exc:  # another worker took the run over; it carries on there
            log.warning("%s", exc)
            return "lease-lost"
        finally:
            drain(loop)
        if result is None:
            log.info("run %s is leased by another worker or finished; skipped", run_id)
            return "skipped"
        if result.queue is not None:
            log.info("run %s: handed to queue %s", run_id, result.queue)
            # If this publish is lost, the sweeper publishes the queued run again.
            publish(
                app or self._celery(),
                run_id,
                queue=result.queue,
                time_limit_s=row["time_limit_s"],
                workflow=row["workflow"],
            )
        return result.status

    def enqueue(
        self,
        workflow: str | Path,
        inputs: Mapping[str, Any] | None = None,
        *,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Record a queued run and publish it for a worker; returns its run id.

        A broker that refuses the message fails the run and raises ``RunError``.
        """
        return self.enqueue_loaded(self.load(workflow), inputs or {}, tags=tags)

    def _plain_runner(self) -> Runner:
        """A runner for store work outside any loop (create, fail): no model clients used."""
        from orchestrator.runner import Runner

        return Runner(settings=self.settings, store=self.store)

    def enqueue_loaded(
        self,
        workflow: LoadedWorkflow,
        inputs: Mapping[str, Any],
        *,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """``enqueue`` for a workflow already loaded."""
        from orchestrator.queue import enqueue_run, first_queue
        from orchestrator.runner import time_limit_s

        settings = self.settings
        queue, limit = first_queue(settings, workflow), time_limit_s(settings, workflow)
        run_id = self._plain_runner().create(
            workflow, inputs, queue=queue, time_limit_s=limit, tags=tags
        )
        try:
            enqueue_run(
                self._celery(), run_id, queue=queue, time_limit_s=limit, workflow=workflow.name
            )
        except RunError as exc:
            self.store.finish_run(run_id, status="failed", error=str(exc))
            raise
        return run_id

    def retry(self, run_id: str, *, from_step: str | None = None) -> str:
        """Queue a retry of the ended run ``run_id`` (a unique prefix will do) for a
        worker: a new run, linked to it, that reuses every step that finished
        there and runs the rest (``from_step`` and its dependents again too).
        Returns the new run's id. ``UserError`` for an unknown or active run."""
        from orchestrator.queue import enqueue_run, first_queue
        from orchestrator.runner import time_limit_s

        workflow, found = self.workflow_of_run(run_id)
        settings = self.settings
        queue, limit = first_queue(settings, workflow), time_limit_s(settings, workflow)
        new_id = self._plain_runner().create_retry(
            workflow, found, from_step=from_step, queue=queue, time_limit_s=limit
        )
        try:
            enqueue_run(
                self._celery(), new_id, queue=queue, time_limit_s=limit, workflow=workflow.name
            )
        except RunError as exc:
            self.store.finish_run(new_id, status="failed", error=str(exc))
            raise
        return new_id

    def decide(
        self,
        run_id: str,
        step_id: str,
        *,
        approved: bool,
        note: str | None = None,
        by: str,
        enqueue: bool = True,
    ) -> tuple[str, str]:
        """Record a person's decision on a waiting approval step of run ``run_id``
        (a unique prefix will do); (the run's whole id, its status after).

        Approved, the run is ``queued`` again, and with ``enqueue`` published for a
        worker (else the caller executes it, as ``tierflow approve`` does). Rejected,
        it is ``failed`` with the note. ``UserError`` if nothing there is waiting,
        or the step was decided already."""
        from orchestrator.queue import enqueue_run

        found = self.store.named_run_id(run_id)
        status = self.store.decide(found, step_id, approved=approved, note=note, by=by)
        if status == "queued" and enqueue:
            row = self.store.run_row(found)
            assert row is not None
            queue = row["queue"] or self.settings.config.queue
            limit = row["time_limit_s"]
            enqueue_run(
                self._celery(), found, queue=queue, time_limit_s=limit, workflow=row["workflow"]
            )
        return found, status

    def workflow_of_run(self, run_id: str) -> tuple[LoadedWorkflow, str]:
        """The workflow of run ``run_id`` as its file is now, and the run's whole id."""
        row = self.store.named_run(run_id)
        return self.load(self.settings.root / row["workflow_path"]), row["id"]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The recorded run (status, inputs, outputs, steps, ledger rows), or None.
        A unique prefix of a run id is enough."""
        return self.store.run(run_id)

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The run once it has ended (succeeded, failed or cancelled).

        Raises ``TimeoutError`` after ``timeout`` seconds, ``UserError`` for an unknown run.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while True:
            found = self.store.run(run_id)
            if found is None:
                raise UserError(f"no run {run_id!r}")
            if found["status"] in ENDED:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} is still {found['status']} after {timeout}s")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def cancel(self, run_id: str) -> str:
        """Cancel a queued or running run; its status afterwards. A running run's
        executor stops its work within a second. ``UserError`` for an unknown run."""
        status = self.store.cancel_run(self.store.named_run_id(run_id))
        if status is None:
            raise UserError(f"no run {run_id!r}")  # deleted in between
        return status

    def spend(
        self,
        *,
        by: str = "workflow",
        since: date | None = None,
        until: date | None = None,
        include_eval: bool = False,
    ) -> list[SpendRow]:
        """Spend grouped ``by`` workflow, version, step, tier, model or day (or several);
        ``tierflow eval`` runs only with ``include_eval``."""
        from orchestrator.reports import spend

        return spend(self.store.engine, by=by, since=since, until=until, include_eval=include_eval)

    async def aclose(self) -> None:
        """Close the model clients of the running loop, then everything else."""
        if self._bound is not None and self._bound[0] is asyncio.get_running_loop():
            await self._bound[1].aclose()
            self._bound = None
        self.close()

    def close(self) -> None:
        """Release the store, the broker connection and the model clients."""
        if self._bound is not None and self._bound[0] is self._loop and self._loop is not None:
            self._loop.run_until_complete(self._bound[1].aclose())
        self._bound = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._app is not None:
            self._app.close()
            self._app = None
        if self._store is not None:
            self._store.engine.dispose()
            self._store = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


_defaults: dict[tuple[Any, ...], Client] = {}


def default_client(config: str | Path | None = None) -> Client:
    """The client of ``config``, made once per process and configuration; made
    again when the file or the TIERFLOW_* variables change."""
    from orchestrator.settings import find_config_path

    path = find_config_path(config)
    key = (
        None if path is None else (str(path.resolve()), path.stat().st_mtime_ns),
        Path.cwd() if path is None else None,
        *(os.environ.get(name) for name in ("TIERFLOW_DATABASE_URL", "TIERFLOW_BROKER_URL")),
    )
    client = _defaults.get(key)
    if client is None:
        client = _defaults[key] = Client(config)
    return client
