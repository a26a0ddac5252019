"""The Celery app: one task that executes a run by id, and a sweeper.

Tasks carry a run id and nothing else; the task calls ``Runner.execute``, the
same code ``tierflow run`` uses. Messages are JSON only. Workers ack late and
take one message at a time; a run is protected from double execution by its
lease in the database, not by the broker.

Tier-affine queues: each tier may name a queue, and ``tierflow worker --tiers
light`` consumes only the queues of those tiers. A task runs the steps its
worker serves; when a step needs another tier, the run is published on that
tier's queue and another worker carries on (see ``Runner``). One task per run
segment, not per step: a coordinator waiting on step tasks would hold a worker
slot idle, and the run's lease already orders its steps.

The default broker is kombu's filesystem transport in ``.tierflow/broker`` next
to tierflow.yaml, so one machine needs no server. We chose it over kombu's
SQLAlchemy transport because it adds no writer to the SQLite file that holds
the ledger, and neither of the two redelivers a message whose worker died: the
sweeper does that for every broker, within the lease TTL.

What a monitor such as Flower sees. The task's name stays
``tierflow.execute_run`` and its arguments stay ``[run_id]``, so workers and
publishers of any version accept each other's messages. A publisher that knows
the run's workflow also sends Celery's ``shadow`` name,
``tierflow.execute_run:WORKFLOW``, which workers log and put in their events in
place of the task's name: the name says the workflow, the argument the run.
A run that ends failed or cancelled makes the task raise ``RunFailed`` (run,
workflow, error), so the task's state is FAILURE. It is an expected exception
(``throws``): logged without a traceback, never retried, and its message acked
like any finished task's (``acks_late`` acks failures too), so nothing
redelivers it; the run's lease and records were settled before it is raised.
Every other outcome is a SUCCESS whose result says what became of the run:
``succeeded``, ``queued`` (handed to another tier's queue), ``waiting`` (for an
approval), ``skipped``, ``lease-lost`` or ``unknown``. A message for a run that
had already ended reports that end again.

Events are what monitors read; there is no result backend. Workers send task
events unless started with ``--no-events``, and publishers send ``task-sent``,
so a run shows from its publishing to its end. On the embedded broker the
transport drops events that no listener's queue is bound to.

The broker is tierflow's choice: ``$TIERFLOW_BROKER_URL``, else ``broker:`` in
tierflow.yaml, else the embedded one. Celery would let ``$CELERY_BROKER_URL``
override the URL it is given; the app pins its read and write URLs so that it
cannot, and a worker and a publisher of one configuration always meet. On the
embedded broker, ``embedded_broker_warning`` gives one line to print at start
when a non-empty environment variable whose name ends in ``BROKER_URL``,
``REDIS_URL`` or ``AMQP_URL`` is set: whoever set it probably meant tierflow to
use it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import RunError, clip
from orchestrator.settings import Settings

if TYPE_CHECKING:
    from orchestrator.client import Client
    from orchestrator.spec import LoadedWorkflow

log = logging.getLogger("tierflow.queue")
TASK = "tierflow.execute_run"
SCHEDULED = "tierflow.enqueue_scheduled"
FAILED = ("failed", "cancelled")  # run statuses that make the task fail


class RunFailed(RunError):
    """The run a task executed ended failed or cancelled: the task's FAILURE state.

    ``str(err)`` names the run, its workflow and the run's error.
    """


def task_name(workflow: str | None) -> str:
    """The name workers log and report for a task that executes a run of ``workflow``."""
    return TASK if workflow is None else f"{TASK}:{workflow}"


def broker_folder(settings: Settings) -> Path:
    return settings.root / ".tierflow" / "broker"


def make_app(settings: Settings, tiers: list[str] | None = None) -> Any:
    """A Celery app for ``settings``; its task executes runs on ``tiers`` (None: all)."""
    from celery import Celery

    app = Celery("tierflow", set_as_current=False)
    url = settings.broker_url
    transport: dict[str, Any] = {}
    if url is None:
        folder = broker_folder(settings)
        folder.mkdir(parents=True, exist_ok=True)
        url = "filesystem://"
        transport = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            # kombu's default is ./control, in whatever directory the process runs.
            "control_folder": str(folder / "control"),
        }
    elif url.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacked message after this long; the lease makes a
        # redelivery harmless, and the sweeper is faster than this anyway.
        transport = {"visibility_timeout": max(3600.0, settings.config.lease_ttl_s * 10)}
    app.conf.update(
        broker_url=url,
        # Celery reads $CELERY_BROKER_URL before broker_url, but not before these.
        broker_read_url=url,
        broker_write_url=url,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.config.queue,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name=TASK, throws=(RunFailed,))  # type: ignore[untyped-decorator]
    def execute_run(run_id: str) -> str:
        status = execute_by_id(settings, run_id, tiers=tiers, app=app)
        if status in FAILED:
            raise failure(settings, run_id, status, tiers=tiers)
        return status

    @app.task(name=SCHEDULED)  # type: ignore[untyped-decorator]
    def enqueue_scheduled(path: str, inputs: dict[str, Any]) -> str:
        from orchestrator.client import Client

        with Client(settings=settings) as client:
            return client.enqueue(settings.root / path, inputs)

    return app


def first_queue(settings: Settings, workflow: LoadedWorkflow) -> str:
    """The queue of the tier the workflow's first step starts on."""
    from orchestrator.scheduler import ladder

    climb = ladder(settings, workflow.steps[0])
    return settings.queue_of(climb[0][0]) if climb else settings.config.queue


_clients: dict[int, Client] = {}


def _client(settings: Settings, tiers: list[str] | None = None) -> Client:
    """The worker process's client, made after the fork and kept from one task to
    the next: its loop, model clients (and their connections), compiled graphs
    and loaded workflows outlive a run."""
    from orchestrator.client import Client

    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = Client(settings=settings, tiers=tiers)
    return _clients[pid]


def execute_by_id(
    settings: Settings, run_id: str, *, tiers: list[str] | None = None, app: Any = None
) -> str:
    """What a worker does with a message: execute the run unless it is leased or
    finished (``Client.execute``). A hand-off is published through ``app``."""
    return _client(settings, tiers).execute(run_id, app=app)


def failure(
    settings: Settings, run_id: str, status: str, *, tiers: list[str] | None = None
) -> RunFailed:
    """The exception that fails the task whose run ended with ``status``."""
    row = _client(settings, tiers).store.run_row(run_id) or {}
    why = f": {clip(row['error'])}" if row.get("error") else ""
    return RunFailed(f"run {run_id} of workflow '{row.get('workflow')}' {status}{why}")


HARD_LIMIT_GRACE_S = 60.0


def drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel whatever a task left on the worker's loop, and wait for it to end.

    The loop outlives the task; a coroutine left on it would resume inside the
    next run this process takes.
    """
    left = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in left:
        task.cancel()
    if left:
        log.warning("cancelled %d tasks left on the loop by the last run", len(left))
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))


def publish(
    app: Any,
    run_id: str,
    *,
    queue: str,
    time_limit_s: float | None,
    workflow: str | None = None,
) -> None:
    """Send the task that executes ``run_id`` to ``queue``'s workers; named after
    ``workflow`` in their logs and events when it is given."""
    # The runner enforces the limit itself and ends the run cleanly; Celery's hard
    # limit, later, is the last resort (it replaces the process). No soft limit:
    # its exception would land inside whatever coroutine runs on the loop.
    limits = {} if time_limit_s is None else {"time_limit": time_limit_s + HARD_LIMIT_GRACE_S}
    app.send_task(
        TASK,
        args=[run_id],
        shadow=task_name(workflow),
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        **limits,
    )


def enqueue_run(
    app: Any,
    run_id: str,
    *,
    queue: str,
    time_limit_s: float | None,
    workflow: str | None = None,
) -> None:
    """Publish a new run's message; raises ``RunError`` if the broker cannot take it."""
    try:
        publish(app, run_id, queue=queue, time_limit_s=time_limit_s, workflow=workflow)
    except Exception as exc:  # kombu's connection errors vary by transport
        raise RunError(f"could not enqueue run {run_id}: {type(exc).__name__}: {exc}") from None


QUEUED_FOR_TTLS = 5  # a queued run untouched for this many lease TTLs is published again


def start_sweeper(settings: Settings) -> threading.Thread:
    """Publish again, every third of the lease TTL, runs whose message may be lost.

    Those are runs whose lease went stale (their worker died) and runs queued
    for longer than ``QUEUED_FOR_TTLS`` lease TTLs (a broker that lost its
    messages in a restart). A duplicate message is harmless: the lease decides.
    Waiting runs whose approval timed out fail here too.
    """
    ttl = settings.config.lease_ttl_s

    def sweep() -> None:
        app = make_app(settings)
        store = _client(settings).store
        event = threading.Event()
        while not event.wait(ttl / 3):
            try:
                if ended := store.abandon_orphans():
                    log.warning("%d ended runs had calls pending; abandoned them", ended)
                for run_id in store.expire_waiting():
                    log.warning("run %s: nobody approved it in time; failed", run_id)
                for row in store.runs_to_publish(
                    lease_ttl_s=ttl, queued_for_s=QUEUED_FOR_TTLS * ttl
                ):
                    why = "its lease went stale" if row["status"] == "running" else "still queued"
                    log.warning("run %s: %s; published again", row["id"], why)
                    queue = row["queue"] or settings.config.queue
                    publish(
                        app,
                        row["id"],
                        queue=queue,
                        time_limit_s=row["time_limit_s"],
                        workflow=row["workflow"],
                    )
            except Exception:  # a broker or database blip: try again next round
                log.exception("sweeper round failed")

    thread = threading.Thread(target=sweep, name="tierflow-sweeper", daemon=True)
    thread.start()
    return thread


def run_worker(
    settings: Settings,
    *,
    concurrency: int,
    queues: list[str] | None,
    tiers: list[str] | None,
    events: bool = True,
) -> None:
    """Run a Celery worker in this process until it is stopped.

    It executes steps on ``tiers`` (None: all), consumes ``queues`` (default:
    the queues of those tiers) and, with ``events``, sends task events.
    """
    from celery import signals

    app = make_app(settings, tiers)
    signals.worker_ready.connect(lambda **_: start_sweeper(settings), weak=False)
    argv = [
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname=tierflow-{os.getpid()}@%h",
        f"--queues={','.join(queues or settings.queues_of(tiers))}",
        *(["--task-events"] if events else []),
    ]
    app.worker_main(argv=argv)


BROKER_VARIABLES = ("BROKER_URL", "REDIS_URL", "AMQP_URL")  # how their names end


def embedded_broker_warning(settings: Settings) -> str | None:
    """One line for a worker or server to print at start when it uses the embedded
    broker while the environment names another (see the module's docstring); else None."""
    if settings.broker_url is not None:
        return None
    named = sorted(
        name for name, value in os.environ.items() if value and name.endswith(BROKER_VARIABLES)
    )
    if not named:
        return None
    return (
        f"using the embedded broker in {broker_folder(settings)}, though the environment"
        f" sets {', '.join('$' + name for name in named)}: tierflow reads only"
        " $TIERFLOW_BROKER_URL or broker: in tierflow.yaml"
    )


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery beat entries for the ``schedule:`` of every workflow in ``workflows_dir``.

    Each entry's task creates the run and publishes it, on the queue of the
    tier its first step starts on, so a worker that can start it records it.
    """
    from orchestrator.spec import crontab_of, load_workflow, project_path

    entries = {}
    for path in sorted((settings.root / settings.config.workflows_dir).glob("*.yaml")):
        workflow = load_workflow(path, settings)
        for index, schedule in enumerate(workflow.spec.schedule, start=1):
            entries[f"{workflow.name}#{index}"] = {
                "task": SCHEDULED,
                "schedule": crontab_of(schedule.cron),
                "args": [project_path(path, settings), schedule.inputs],
                "options": {"queue": first_queue(settings, workflow)},
            }
    return entries


def run_beat(settings: Settings) -> None:
    """Run Celery beat in this process: it enqueues scheduled workflows until stopped."""
    from orchestrator.errors import UserError

    entries = beat_schedule(settings)
    if not entries:
        folder = settings.root / settings.config.workflows_dir
        raise UserError(f"no workflow in {folder} has a schedule: nothing for beat to do")
    app = make_app(settings)
    app.conf.update(beat_schedule=entries, timezone="UTC", enable_utc=True)
    state = settings.root / ".tierflow" / "beat-schedule"
    state.parent.mkdir(parents=True, exist_ok=True)
    app.start(argv=["beat", "--loglevel=INFO", f"--schedule={state}"])


def check_tier_queues(settings: Settings, tiers: list[str]) -> None:
    """Refuse a worker for ``tiers`` whose queues also carry steps of other tiers.

    It would take those runs and hand them back to the same queue, round and round.
    """
    from orchestrator.errors import UserError

    for tier in settings.tier_names:
        queue = settings.queue_of(tier)
        if tier not in tiers and queue in settings.queues_of(tiers):
            raise UserError(
                f"--tiers {','.join(tiers)}: queue '{queue}' also carries tier '{tier}';"
                f" give tier '{tier}' a queue of its own in tierflow.yaml (tiers.{tier}.queue)"
            )
