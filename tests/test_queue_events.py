"""What a monitor such as Flower sees of runs on real `tierflow worker` processes.

Flower knows tasks only from Celery's events; these tests read the same events
from Redis with Celery's own receiver and fold them into ``celery.events.State``,
the model Flower builds on, so they assert what Flower shows, not how tierflow
sends it.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, missing_service, tiers_for, wait_for, write_two_steps
from test_queue import BROKERS, Worker, reachable, start_worker, status, workers  # noqa: F401

import orchestrator
from orchestrator.queue import (
    BROKER_VARIABLES,
    TASK,
    embedded_broker_warning,
    first_queue,
    make_app,
    publish,
)
from orchestrator.settings import load_settings
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

SYNC = "tierflow-test-sync"  # an event of the test's own, to know the receiver listens


class Monitor:
    """Celery events from the broker, captured on a thread as Flower captures them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self.events.append})
        self._thread = threading.Thread(
            target=self._receiver.capture, kwargs={"wakeup": False}, daemon=True
        )
        self._thread.start()
        # Redis drops events nobody subscribes to yet: send our own until one comes back.
        with app.connection_for_write() as connection:
            dispatcher = app.events.Dispatcher(connection)
            wait_for(lambda: dispatcher.send(SYNC) is None and self.seen(SYNC), timeout=30)
            dispatcher.close()

    def seen(self, kind: str, *, uuid: str | None = None) -> bool:
        return any(
            event["type"] == kind and (uuid is None or event.get("uuid") == uuid)
            for event in list(self.events)
        )

    def state(self) -> Any:
        """The events so far, folded as Flower folds them."""
        state = self.app.events.State()
        for event in list(self.events):
            state.event(event)
        return state

    def tasks_of(self, run_id: str) -> list[Any]:
        """The tasks whose argument is ``run_id``, oldest first."""
        found = [task for task in self.state().tasks.values() if task.args == repr([run_id])]
        return sorted(found, key=lambda task: task.sent or task.received)

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.close()


@pytest.fixture
def on_redis(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    """A project on Redis whose tiers have queues of their own; workflows ``mixed``
    (light, then frontier), ``gated`` (light, then a person) and ``doomed`` (frontier)."""
    if not reachable(str(BROKERS["redis"])):
        missing_service("redis is not running on 127.0.0.1")
    suffix = uuid.uuid4().hex[:10]
    tiers = tiers_for(ollama, frontier, timeout_s=60)
    tiers["light"]["queue"] = f"light-{suffix}"
    tiers["frontier"]["queue"] = f"frontier-{suffix}"
    project = Project(
        tmp_path / "p",
        {"tiers": tiers, "broker": BROKERS["redis"], "queue": f"default-{suffix}"},
    )
    draft = {"id": "draft", "agent": "helper", "tier": "light", "prompt": "draft"}
    project.workflow(
        {
            "name": "mixed",
            "steps": [
                draft,
                {"id": "review", "agent": "helper", "tier": "frontier", "needs": ["draft"]},
            ],
        }
    )
    project.workflow(
        {
            "name": "gated",
            "steps": [draft, {"id": "gate", "needs": ["draft"], "approval": {"message": "ok?"}}],
        }
    )
    project.workflow(
        {
            "name": "doomed",
            "steps": [{"id": "answer", "agent": "helper", "tier": "frontier", "prompt": "doomed"}],
        }
    )
    return project


def recorded(project: Project, name: str) -> tuple[str, str]:
    """A queued run of workflow ``name``, recorded but not published: (its id, its queue)."""
    runner, workflow, store = project.runner(name)
    try:
        queue = first_queue(load_settings(project.config), workflow)
        return runner.create(workflow, {}, queue=queue), queue
    finally:
        store.engine.dispose()


@pytest.fixture
def no_broker_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the variables the broker warning looks for, whatever the shell has."""
    for name in list(os.environ):
        if name == "TIERFLOW_BROKER_URL" or name.endswith(BROKER_VARIABLES):
            monkeypatch.delenv(name)


@pytest.fixture
def monitor(on_redis: Project) -> Iterator[Monitor]:
    app = make_app(load_settings(on_redis.config))
    watching = Monitor(app)
    yield watching
    watching.close()
    app.close()


def test_a_failed_run_is_a_failed_task_and_a_hand_off_or_a_wait_is_not(
    on_redis: Project,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    monitor: Monitor,
    workers: list[Worker],  # noqa: F811
) -> None:
    ollama.default = Reply(text="drafted")
    frontier.responder = lambda body: (
        Reply(status=400, text="the frontier model refuses")
        if body["messages"][-1]["content"] == "doomed"
        else Reply(text="reviewed")
    )
    light = start_worker(on_redis, workers, "--tiers", "light")
    heavy = start_worker(on_redis, workers, "--tiers", "frontier")
    assert "task events: ON" in light.log.read_text()

    mixed = orchestrator.enqueue("mixed", config=str(on_redis.config))
    doomed, queue = recorded(on_redis, "doomed")
    # Published as tierflow publishes a run whose workflow it knows.
    publish(monitor.app, doomed, queue=queue, time_limit_s=None, workflow="doomed")
    gated, queue = recorded(on_redis, "gated")
    # As a publisher of an older version sends it: the run id alone.
    monitor.app.send_task(TASK, args=[gated], queue=queue)
    cancelled, queue = recorded(on_redis, "doomed")
    with orchestrator.Client(config=str(on_redis.config)) as client:
        assert client.cancel(cancelled) == "cancelled"
    publish(monitor.app, cancelled, queue=queue, time_limit_s=None, workflow="doomed")

    wait_for(lambda: status(on_redis, doomed) == "failed")
    wait_for(lambda: status(on_redis, mixed) == "succeeded")
    wait_for(lambda: status(on_redis, gated) == "waiting")
    # A task's last event follows its run's last write.
    wait_for(lambda: len([t for t in monitor.tasks_of(mixed) if t.state == "SUCCESS"]) == 2)
    wait_for(lambda: [t.state for t in monitor.tasks_of(gated)] == ["SUCCESS"])
    wait_for(lambda: [t.state for t in monitor.tasks_of(doomed)] == ["FAILURE"])
    wait_for(lambda: [t.state for t in monitor.tasks_of(cancelled)] == ["FAILURE"])

    [failed] = monitor.tasks_of(doomed)
    assert failed.name == "tierflow.execute_run:doomed"  # the workflow, in Flower's name column
    assert failed.args == repr([doomed])  # the run, in its args column
    assert failed.sent is not None and failed.received is not None  # the publisher's event too
    assert failed.exception.startswith("RunFailed(")
    assert f"run {doomed} of workflow 'doomed' failed" in failed.exception
    assert "the frontier model refuses" in failed.exception
    assert failed.retries == 0 and not monitor.seen("task-retried", uuid=failed.uuid)
    assert failed.worker.hostname.startswith(f"tierflow-{heavy.proc.pid}@")
    assert "raised expected: RunFailed" in heavy.log.read_text()
    assert "Traceback" not in heavy.log.read_text()
    assert len(frontier.chat_requests()) == 2  # doomed once, never again; review once
    [dropped] = monitor.tasks_of(cancelled)
    assert f"run {cancelled} of workflow 'doomed' cancelled" in dropped.exception

    handed, finished = monitor.tasks_of(mixed)
    assert (handed.result, finished.result) == ("'queued'", "'succeeded'")
    assert handed.worker.hostname != finished.worker.hostname
    assert finished.parent_id == handed.uuid  # the hand-off, published by the light worker
    [waiting] = monitor.tasks_of(gated)
    assert (waiting.name, waiting.result) == (TASK, "'waiting'")

    # Warm shutdown puts back every message a worker took and did not ack: none.
    for worker in workers:
        worker.kill(signal.SIGTERM)
    queues = load_settings(on_redis.config).queues_of(None)
    with monitor.app.connection_for_read() as connection:
        channel = connection.default_channel
        left = {q: channel.queue_declare(queue=q).message_count for q in queues}
    assert set(left.values()) == {0}, left
    assert status(on_redis, doomed) == "failed"


def test_a_worker_sends_no_task_events_when_told(
    project: Project,
    workers: list[Worker],  # noqa: F811
) -> None:
    write_two_steps(project)
    worker = start_worker(project, workers, "--no-events")
    assert "task events: OFF" in worker.log.read_text()


def test_a_worker_on_the_embedded_broker_warns_of_broker_variables_it_ignores(
    project: Project,
    ollama: OllamaServer,
    workers: list[Worker],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    no_broker_variables: None,
) -> None:
    write_two_steps(project)
    ollama.default = Reply(text="ok")
    # Nothing listens on port 1: a worker or a publisher that went there would never start.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:s3cret@127.0.0.1:1/0")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/1")
    monkeypatch.setenv("DATABASE_URL", "postgresql://127.0.0.1:1/db")  # not a broker's
    worker = start_worker(project, workers)
    log = worker.log.read_text()
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: using the embedded broker in {project.root / '.tierflow' / 'broker'},"
        " though the environment sets $CELERY_BROKER_URL, $REDIS_URL: tierflow reads only"
        " $TIERFLOW_BROKER_URL or broker: in tierflow.yaml"
    ]
    assert "s3cret" not in log
    assert "transport:   filesystem://" in log
    run_id = orchestrator.enqueue("two", config=str(project.config))
    wait_for(lambda: status(project, run_id) == "succeeded")


def test_the_broker_warning_is_for_the_embedded_broker_and_set_variables_only(
    project: Project, monkeypatch: pytest.MonkeyPatch, no_broker_variables: None
) -> None:
    settings = load_settings(project.config)
    assert embedded_broker_warning(settings) is None
    monkeypatch.setenv("BROKER_URL", "")  # empty: not set
    assert embedded_broker_warning(settings) is None
    monkeypatch.setenv("CLOUDAMQP_URL", "amqp://broker.example//")
    assert "the environment sets $CLOUDAMQP_URL:" in str(embedded_broker_warning(settings))
    monkeypatch.setenv("TIERFLOW_BROKER_URL", BROKERS["redis"] or "")
    assert embedded_broker_warning(load_settings(project.config)) is None
