"""Runs through a real Celery worker subprocess, on the embedded broker, Redis and RabbitMQ."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Project, missing_service, tiers_for, wait_for, write_two_steps

import orchestrator
from orchestrator.queue import TASK, beat_schedule, make_app, publish
from orchestrator.runner import time_limit_s
from orchestrator.settings import load_settings
from orchestrator.spec import find_workflow, load_workflow
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

    def __init__(self, project: Project, log: Path, *options: str) -> None:
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
                *options,
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


def start_worker(project: Project, workers: list[Worker], *options: str) -> Worker:
    worker = Worker(project, project.root / f"worker{len(workers)}.log", *options)
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
    # Its request, not just its pending row (written first), must be at the model:
    # killed in between, the next worker's try would be the slow one.
    wait_for(lambda: "second" in asked)
    assert ("second", 1, "pending") in queued.ledger_states()
    doomed.kill(signal.SIGKILL)  # mid-step, waiting on the slow model
    start_worker(queued, workers)  # its sweeper finds the stale lease and enqueues the run again
    wait_for(lambda: status(queued, run_id) == "succeeded")
    assert asked.count("first") == 1  # the finished step never ran again
    assert queued.ledger_states() == [
        ("first", 1, "settled"),
        ("second", 1, "abandoned"),
        ("second", 2, "settled"),
    ]


def test_a_paused_worker_that_lost_its_run_writes_nothing_and_asks_no_model(
    queued: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    asked: list[str] = []
    stopped = threading.Event()

    def answer(body: dict[str, Any]) -> Reply:
        asked.append(body["messages"][-1]["content"])
        if asked == ["first"]:
            stopped.wait(timeout=60)  # the paused worker gets its answer only once stopped
        return Reply(text=asked[-1])

    ollama.responder = answer
    paused = start_worker(queued, workers)
    run_id = orchestrator.enqueue("two", config=str(queued.config))
    wait_for(lambda: asked == ["first"])  # its request is in flight
    os.killpg(paused.proc.pid, signal.SIGSTOP)
    stopped.set()
    try:
        start_worker(queued, workers)  # its sweeper finds the stale lease and takes the run
        wait_for(lambda: status(queued, run_id) == "succeeded")
    finally:
        os.killpg(paused.proc.pid, signal.SIGCONT)
    # Woken, the first executor finds its lease taken: it records nothing, asks nothing.
    wait_for(lambda: "'lease-lost'" in paused.log.read_text())
    assert asked == ["first", "first", "second"]
    assert queued.ledger_states() == [
        ("first", 1, "abandoned"),  # the paused call, ended by the executor that took over
        ("first", 2, "settled"),
        ("second", 1, "settled"),
    ]
    run = orchestrator.get_run(run_id, config=str(queued.config))
    assert run is not None and (run["status"], run["error"]) == ("succeeded", None)
    assert [step["status"] for step in run["steps"]] == ["succeeded", "succeeded"]


def fan_out(project: Project, items: int) -> None:
    """Workflow ``fan``: one step asked once per element of ``inputs.words``."""
    project.workflow(
        {
            "name": "fan",
            "max_steps": max(items, 1),
            "inputs": {"words": {"type": "array", "default": [f"w{i}" for i in range(items)]}},
            "steps": [
                {
                    "id": "each",
                    "agent": "helper",
                    "tier": "light",
                    "for_each": "inputs.words",
                    "prompt": "{{ item }}",
                },
            ],
        }
    )


def test_a_run_past_its_time_limit_ends_cleanly_and_the_worker_starts_clean(
    queued: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    fan_out(queued, 20)
    ollama.responder = lambda body: Reply(text="late", delay_s=60)
    start_worker(queued, workers)  # one process, one loop, for both runs
    settings = load_settings(queued.config)
    runner, workflow, store = queued.runner("fan")
    # Long enough for the first wave of items to be in flight on a loaded machine.
    run_id = runner.create(workflow, {}, queue=settings.config.queue, time_limit_s=15)
    store.engine.dispose()
    app = make_app(settings)
    publish(app, run_id, queue=settings.config.queue, time_limit_s=15)
    wait_for(lambda: status(queued, run_id) == "failed")
    run = orchestrator.get_run(run_id, config=str(queued.config))
    assert run is not None and "time limit of 15s" in run["error"]
    cut_off = [call["state"] for call in run["calls"]]
    assert cut_off == ["abandoned"] * 8  # one wave of items was in flight; no more started
    assert len(ollama.chat_requests()) == 8

    ollama.responder = lambda body: Reply(text="quick")
    second = orchestrator.enqueue("two", config=str(queued.config))
    wait_for(lambda: status(queued, second) == "succeeded")
    time.sleep(1)  # anything left of the first run on the worker's loop would show by now
    run = orchestrator.get_run(run_id, config=str(queued.config))
    assert run is not None and [call["state"] for call in run["calls"]] == cut_off
    later = orchestrator.get_run(second, config=str(queued.config))
    assert later is not None and [call["state"] for call in later["calls"]] == ["settled"] * 2
    assert len(ollama.chat_requests()) == 10
    app.close()


def test_time_limits_count_fan_out_waves_and_step_timeouts(project: Project) -> None:
    write_two_steps(project)
    fan_out(project, 400)
    settings = load_settings(project.config)
    two = load_workflow(find_workflow("two", settings), settings)
    fan = load_workflow(find_workflow("fan", settings), settings)
    # 400 items in waves of 8, each wave using every attempt at the 5 s tier timeout.
    assert time_limit_s(settings, fan) >= 50 * 3 * 5
    data = yaml.safe_load((project.root / "workflows" / "two.yaml").read_text())
    data["steps"][1]["timeout_s"] = 600
    project.workflow(data)
    slow = load_workflow(find_workflow("two", settings), settings)
    assert time_limit_s(settings, slow) >= 3 * 600 + time_limit_s(settings, two) - 3 * 5 * 2


def test_a_400_item_fan_out_runs_to_the_end_on_a_worker(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, workers: list[Worker]
) -> None:
    project = Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier, timeout_s=60),
            "queue": f"tierflow-test-{uuid.uuid4().hex[:10]}",
        },
    )
    fan_out(project, 400)
    ollama.responder = lambda body: Reply(text=body["messages"][-1]["content"].upper())
    start_worker(project, workers)
    run_id = orchestrator.enqueue("fan", config=str(project.config))
    wait_for(lambda: status(project, run_id) == "succeeded", timeout=120)
    run = orchestrator.get_run(run_id, config=str(project.config))
    assert run is not None
    assert run["outputs"]["each"] == [f"W{i}" for i in range(400)]
    assert [call["state"] for call in run["calls"]] == ["settled"] * 400


def test_a_redelivered_message_does_not_call_the_model_twice(
    queued: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    asked: list[str] = []
    skipped = threading.Event()

    def answer(body: dict[str, Any]) -> Reply:
        asked.append(body["messages"][-1]["content"])
        if asked[-1] == "first":
            skipped.wait(timeout=60)  # in flight until the duplicate has come and gone
        return Reply(text="ok")

    def logs() -> str:
        return "".join(w.log.read_text() for w in workers)

    ollama.responder = answer
    start_worker(queued, workers)
    start_worker(queued, workers)
    run_id = orchestrator.enqueue("two", config=str(queued.config))
    wait_for(lambda: asked == ["first"])
    # The broker hands the same run to the idle worker, as Redis does after its visibility timeout.
    app = make_app(load_settings(queued.config))
    app.send_task(TASK, args=[run_id])
    app.close()
    wait_for(lambda: "skipped" in logs())  # while the first worker still holds the run
    skipped.set()
    wait_for(lambda: status(queued, run_id) == "succeeded")
    assert asked == ["first", "second"]
    assert queued.ledger_states() == [("first", 1, "settled"), ("second", 1, "settled")]


def test_steps_of_one_run_go_to_the_workers_of_their_tiers(
    tmp_path: Path,
    broker: str | None,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    workers: list[Worker],
) -> None:
    suffix = uuid.uuid4().hex[:10]
    tiers = tiers_for(ollama, frontier, timeout_s=60)
    tiers["light"]["queue"] = f"gpu-{suffix}"
    tiers["frontier"]["queue"] = f"cpu-{suffix}"
    config: dict[str, Any] = {"tiers": tiers, "lease_ttl_s": 1.5, "queue": f"default-{suffix}"}
    if broker:
        config["broker"] = broker
    project = Project(tmp_path / "p", config)
    project.workflow(
        {
            "name": "mixed",
            "steps": [
                {"id": "draft", "agent": "helper", "tier": "light", "prompt": "draft"},
                {
                    "id": "review",
                    "agent": "helper",
                    "tier": "frontier",
                    "needs": ["draft"],
                    "prompt": "review",
                },
            ],
        }
    )
    ollama.reply("drafted")
    frontier.reply("reviewed")
    gpu = start_worker(project, workers, "--tiers", "light")
    cpu = start_worker(project, workers, "--tiers", "frontier")
    run_id = orchestrator.enqueue("mixed", config=str(project.config))
    wait_for(lambda: status(project, run_id) == "succeeded")
    assert [(c["step_id"], c["tier_used"]) for c in project.calls(run_id)] == [
        ("draft", "light"),
        ("review", "frontier"),
    ]
    # The light worker ran the draft and handed the run on; the frontier worker finished it.
    assert f"handed to queue cpu-{suffix}" in gpu.log.read_text()
    assert "Task tierflow.execute_run" in cpu.log.read_text()  # named after its workflow or not
    assert "handed to queue" not in cpu.log.read_text()


def restart_redis() -> None:
    """Stop the local Redis without saving, and start it again from its configuration: empty."""
    import redis

    conf = Path("/etc/redis/redis.conf")
    if not conf.exists():
        missing_service("no /etc/redis/redis.conf to restart Redis from")
    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # it closes the connection as it goes down
    finally:
        client.close()
    wait_for(lambda: not reachable("redis://"), timeout=10)
    subprocess.run(["redis-server", str(conf), "--save", ""], check=True)
    wait_for(lambda: reachable("redis://"), timeout=10)


def test_queued_runs_finish_after_redis_restarts_empty(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer, workers: list[Worker]
) -> None:
    import redis

    if not reachable("redis://"):
        missing_service("redis is not running on 127.0.0.1")
    queue = f"tierflow-test-{uuid.uuid4().hex[:10]}"
    project = Project(
        tmp_path / "p",
        {
            "tiers": tiers_for(ollama, frontier, timeout_s=60),
            "lease_ttl_s": 1,
            "queue": queue,
            "broker": BROKERS["redis"],
        },
    )
    write_two_steps(project)
    ollama.reply("ok")
    run_ids = [orchestrator.enqueue("two", config=str(project.config)) for _ in range(3)]
    client = redis.Redis(host="127.0.0.1", port=6379)
    assert client.llen(queue) == 3
    client.close()

    restart_redis()
    client = redis.Redis(host="127.0.0.1", port=6379)
    assert client.llen(queue) == 0  # the messages are gone with the restart
    client.close()

    start_worker(project, workers)  # its sweeper publishes the runs still queued
    wait_for(lambda: all(status(project, run_id) == "succeeded" for run_id in run_ids))
    assert sorted(project.ledger_states()) == sorted(
        [("first", 1, "settled"), ("second", 1, "settled")] * 3
    )


@pytest.fixture
def scheduled(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    """A project on the embedded broker whose workflow ``nightly`` has two schedules."""
    project = Project(
        tmp_path / "p",
        {"tiers": tiers_for(ollama, frontier, timeout_s=60), "queue": "tierflow-scheduled"},
    )
    project.workflow(
        {
            "name": "nightly",
            "steps": [{"id": "summary", "agent": "helper", "tier": "light"}],
            "schedule": [
                {"cron": "*/15 6-18 * * 1-5", "inputs": {"text": "weekday"}},
                {"cron": "0 3 1 * *"},
            ],
        }
    )
    return project


def test_beat_has_one_entry_per_schedule(scheduled: Project) -> None:
    entries = beat_schedule(load_settings(scheduled.config))
    assert list(entries) == ["nightly#1", "nightly#2"]
    weekday = entries["nightly#1"]
    # Relative to the project, so beat and workers may run from different checkouts.
    assert weekday["args"] == ["workflows/nightly.yaml", {"text": "weekday"}]
    assert weekday["options"] == {"queue": "tierflow-scheduled"}
    cron = weekday["schedule"]
    assert (cron.minute, cron.hour, cron.day_of_week) == (
        {0, 15, 30, 45},
        set(range(6, 19)),
        set(range(1, 6)),
    )
    monthly = entries["nightly#2"]["schedule"]
    assert (monthly.minute, monthly.hour, monthly.day_of_month) == ({0}, {3}, {1})


def test_a_scheduled_run_is_recorded_and_executed(
    scheduled: Project, ollama: OllamaServer, workers: list[Worker]
) -> None:
    ollama.responder = lambda body: Reply(text=body["messages"][-1]["content"].upper())
    log = scheduled.root / "beat.log"
    with log.open("w") as out:
        beat = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "beat", "--config", str(scheduled.config)],
            cwd=scheduled.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: "beat: Starting" in log.read_text() or beat.poll() is not None)
        finally:
            os.killpg(beat.pid, signal.SIGTERM)
            beat.wait(timeout=15)
    assert "beat: Starting" in log.read_text() and "Traceback" not in log.read_text()
    # What beat sends when an entry is due (a cron line is due at most once a minute).
    start_worker(scheduled, workers)
    entry = beat_schedule(load_settings(scheduled.config))["nightly#1"]
    app = make_app(load_settings(scheduled.config))
    app.send_task(entry["task"], args=entry["args"], **entry["options"])
    app.close()
    store = scheduled.store()
    try:
        wait_for(lambda: [r["status"] for r in store.runs()] == ["succeeded"])
        [run] = store.runs()
    finally:
        store.engine.dispose()
    found = orchestrator.get_run(run["id"], config=str(scheduled.config))
    assert found is not None and found["outputs"] == {"summary": "WEEKDAY"}


def test_beat_without_schedules_says_so(project: Project) -> None:
    write_two_steps(project)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "beat", "--config", str(project.config)],
        capture_output=True,
        text=True,
        cwd=project.root,
    )
    assert proc.returncode == 2
    assert "has a schedule: nothing for beat to do" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ("lihgt", "--tiers: no tier 'lihgt' in the configuration (did you mean 'light'?)"),
        ("light", "queue 'tierflow' also carries tier 'frontier'; give tier 'frontier' a queue"),
    ],
)
def test_worker_refuses_tiers_it_cannot_serve_alone(
    project: Project, tiers: str, message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "worker", "--tiers", tiers],
        capture_output=True,
        text=True,
        cwd=project.root,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
