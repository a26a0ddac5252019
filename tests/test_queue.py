"""Runs through a real Celery worker subprocess, on the embedded broker, Redis and RabbitMQ."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Project, missing_service, tiers_for, wait_for, write_two_steps

import orchestrator
from orchestrator.queue import TASK, make_app
from orchestrator.settings import load_settings
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

BROKERS = {
    "embedded": None,
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}


def reachable(url: str) -> bool:
    port = 6379 if url.startswith("redis") else 5672
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=list(BROKERS))
def broker(request: pytest.FixtureRequest) -> str | None:
    url = BROKERS[request.param]
    if url is not None and not reachable(url):
        missing_service(f"{request.param} is not running on 127.0.0.1")
    return url


@pytest.fixture
def queued(
    tmp_path: Path, broker: str | None, ollama: OllamaServer, frontier: OpenAIServer
) -> Project:
    config: dict[str, Any] = {
        "tiers": tiers_for(ollama, frontier, timeout_s=60),
        "lease_ttl_s": 1.5,
        "queue": f"tierflow-test-{uuid.uuid4().hex[:10]}",  # no leftovers from other runs
    }
    if broker:
        config["broker"] = broker
    project = Project(tmp_path / "p", config)
    write_two_steps(project)
    return project


class Worker:
    """A `tierflow worker` subprocess in its own process group."""

    def __init__(self, project: Project, log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "worker",
                "--concurrency",
                "1",
                "--config",
                str(project.config),
            ],
            cwd=project.root,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: "ready." in log.read_text() or self.proc.poll() is not None, timeout=60)
        assert self.proc.poll() is None, log.read_text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.kill(signal.SIGTERM)


def start_worker(project: Project, workers: list[Worker]) -> Worker:
    worker = Worker(project, project.root / f"worker{len(workers)}.log")
    workers.append(worker)
    return worker


def status(project: Project, run_id: str) -> str:
    run = orchestrator.get_run(run_id, config=str(project.config))
    assert run is not None
    return str(run["status"])


def test_enqueued_run_is_executed_by_a_worker(
    queued: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    ollama.responder = lambda body: Reply(text=body["messages"][-1]["content"].upper())
    start_worker(queued, workers)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "enqueue", "two", "--config", str(queued.config)],
        capture_output=True,
        text=True,
        cwd=queued.root,
    )
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    assert status(queued, run_id) in ("queued", "running", "succeeded")
    wait_for(lambda: status(queued, run_id) == "succeeded")
    run = orchestrator.get_run(run_id, config=str(queued.config))
    assert run is not None and run["outputs"] == {"first": "FIRST", "second": "SECOND"}
    assert queued.ledger_states() == [("first", 1, "settled"), ("second", 1, "settled")]


def test_a_killed_worker_leaves_the_run_to_another(
    queued: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    asked: list[str] = []

    def answer(body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        asked.append(prompt)
        slow = prompt == "second" and asked.count("second") == 1  # only the first try hangs
        return Reply(text=prompt, delay_s=60 if slow else 0)

    ollama.responder = answer
    doomed = start_worker(queued, workers)
    run_id = orchestrator.enqueue("two", config=str(queued.config))
    wait_for(lambda: ("second", 1, "pending") in queued.ledger_states())
    doomed.kill(signal.SIGKILL)  # mid-step, waiting on the slow model
    start_worker(queued, workers)  # its sweeper finds the stale lease and enqueues the run again
    wait_for(lambda: status(queued, run_id) == "succeeded")
    assert asked.count("first") == 1  # the finished step never ran again
    assert queued.ledger_states() == [
        ("first", 1, "settled"),
        ("second", 1, "abandoned"),
        ("second", 2, "settled"),
    ]


def test_a_redelivered_message_does_not_call_the_model_twice(
    queued: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    asked: list[str] = []

    def answer(body: dict[str, Any]) -> Reply:
        asked.append(body["messages"][-1]["content"])
        return Reply(text="ok", delay_s=2 if asked[-1] == "first" else 0)

    ollama.responder = answer
    start_worker(queued, workers)
    start_worker(queued, workers)
    run_id = orchestrator.enqueue("two", config=str(queued.config))
    wait_for(lambda: ("first", 1, "pending") in queued.ledger_states())
    # The broker hands the same run to the idle worker, as Redis does after its visibility timeout.
    app = make_app(load_settings(queued.config))
    app.send_task(TASK, args=[run_id])
    app.close()
    wait_for(lambda: status(queued, run_id) == "succeeded")
    time.sleep(1)  # give the duplicate time to be consumed
    assert asked == ["first", "second"]
    assert queued.ledger_states() == [("first", 1, "settled"), ("second", 1, "settled")]
    logs = "".join(w.log.read_text() for w in workers)
    assert "skipped" in logs
