"""The Celery app: one task that executes a run by id, and a sweeper.

Tasks carry a run id and nothing else; the task calls ``Runner.execute``, the
same code ``tierflow run`` uses. Messages are JSON only. Workers ack late and
take one message at a time; a run is protected from double execution by its
lease in the database, not by the broker.

The default broker is kombu's filesystem transport in ``.tierflow/broker`` next
to tierflow.yaml, so one machine needs no server. We chose it over kombu's
SQLAlchemy transport because it adds no writer to the SQLite file that holds
the ledger, and neither of the two redelivers a message whose worker died: the
sweeper does that for every broker, within the lease TTL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

from orchestrator.settings import Settings

log = logging.getLogger("tierflow.queue")
TASK = "tierflow.execute_run"


def broker_folder(settings: Settings) -> Path:
    return settings.root / ".tierflow" / "broker"


def make_app(settings: Settings) -> Any:
    """A Celery app for ``settings``; its one task executes runs from this configuration."""
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
        worker_hijack_root_logger=False,
    )

    @app.task(name=TASK)  # type: ignore[untyped-decorator]
    def execute_run(run_id: str) -> str:
        return execute_by_id(settings, run_id)

    return app


def time_limit_s(settings: Settings, steps: int) -> float:
    """A hard limit for one run's task: every step using every attempt at the slowest model."""
    slowest = max(
        entry.timeout_s for tier in settings.config.tiers.values() for entry in tier.models
    )
    return steps * settings.config.escalation.max_attempts * slowest + 60


_stores: dict[int, Any] = {}


def _store(settings: Settings) -> Any:
    # One engine per worker process, made after the fork.
    from orchestrator.runner import open_store

    pid = os.getpid()
    if pid not in _stores:
        _stores[pid] = open_store(settings)
    return _stores[pid]


def execute_by_id(settings: Settings, run_id: str) -> str:
    """What a worker does with a message: execute the run unless it is leased or finished."""
    from orchestrator.runner import Runner
    from orchestrator.spec import load_workflow

    store = _store(settings)
    row = store.run_row(run_id)
    if row is None:
        log.warning("run %s: no such run", run_id)
        return "unknown"
    if row["status"] not in ("queued", "running"):
        return row["status"]  # type: ignore[no-any-return]
    workflow = load_workflow(row["workflow_path"], settings)
    try:
        result = asyncio.run(Runner(settings=settings, store=store).execute(workflow, run_id))
    except asyncio.CancelledError:  # the lease was lost mid-run; its new holder carries on
        log.warning("run %s: lease lost to another worker; stopped here", run_id)
        return "lease-lost"
    if result is None:
        log.info("run %s is leased by another worker or finished; skipped", run_id)
        return "skipped"
    return result.status


def enqueue_run(settings: Settings, run_id: str, *, steps: int) -> None:
    """Publish the run's message; raises ``RunError`` if the broker cannot take it."""
    from orchestrator.errors import RunError

    limit = time_limit_s(settings, steps)
    app = make_app(settings)
    try:
        app.send_task(
            TASK,
            args=[run_id],
            time_limit=limit,
            soft_time_limit=limit - 30,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu's connection errors vary by transport
        raise RunError(f"could not enqueue run {run_id}: {type(exc).__name__}: {exc}") from None
    finally:
        app.close()  # the producer pool's connection


def start_sweeper(settings: Settings) -> threading.Thread:
    """Re-enqueue runs whose lease went stale, checking every third of the lease TTL."""
    interval = settings.config.lease_ttl_s / 3

    def sweep() -> None:
        app = make_app(settings)
        store = _store(settings)
        event = threading.Event()
        while not event.wait(interval):
            try:
                for run_id in store.stale_runs():
                    log.warning("run %s: its lease went stale; enqueued again", run_id)
                    app.send_task(TASK, args=[run_id])
            except Exception:  # a broker or database blip: try again next round
                log.exception("sweeper round failed")

    thread = threading.Thread(target=sweep, name="tierflow-sweeper", daemon=True)
    thread.start()
    return thread


def run_worker(settings: Settings, *, concurrency: int, queues: list[str] | None) -> None:
    """Run a Celery worker in this process until it is stopped."""
    from celery import signals

    app = make_app(settings)
    signals.worker_ready.connect(lambda **_: start_sweeper(settings), weak=False)
    argv = [
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        "--without-gossip",
        "--without-mingle",
        f"--hostname=tierflow-{os.getpid()}@%h",
        f"--queues={','.join(queues or [settings.config.queue])}",
    ]
    app.worker_main(argv=argv)
