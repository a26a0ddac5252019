"""Runs per second through a real queue, against raw Celery on the same broker.

A 3-step workflow runs against an instant loopback Ollama server (its own
process), through Redis, with 2 `tierflow worker` processes (concurrency 1
each). Each round enqueues N runs with ``orchestrator.enqueue`` and waits for
all to succeed. The baseline, in the same rounds, is a raw Celery chain of 3
no-op tasks per run, on the same broker, with 2 worker processes and the same
worker settings (JSON, acks_late, prefetch 1); its last task counts in Redis.
Rounds alternate between the two; figures are medians. The ledger is SQLite
unless ``--database`` names another.

    python bench/queue.py [--runs 40] [--rounds 5] [--database URL]

Goals: ratio ≥ 0.5; worker RSS ≤ 150 MB per process.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Run as a script, this file's folder comes first on sys.path, and this file
# would shadow the standard library's ``queue``, which kombu imports.
sys.path = [entry for entry in sys.path if not entry.endswith("bench")]

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import yaml

BROKER = "redis://127.0.0.1:6379/0"

CHAIN_TASKS = """
import os
import redis
from celery import Celery

app = Celery("chain", broker=os.environ["BENCH_BROKER"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ["BENCH_QUEUE"],
    worker_hijack_root_logger=False,
)
counter = redis.Redis.from_url(os.environ["BENCH_BROKER"])


@app.task(name="noop")
def noop() -> None:
    pass


@app.task(name="done")
def done(key: str) -> None:
    counter.incr(key)
"""


def write_project(root: Path, ollama_url: str, database: str | None, queue: str) -> Path:
    (root / "agents").mkdir(parents=True)
    (root / "workflows").mkdir()
    config = {
        "database": database or f"sqlite:///{root / 'bench.db'}",
        "broker": BROKER,
        "queue": queue,
        "tiers": {
            "light": {
                "local": True,
                "models": [{"model": "ollama/llama3.2:1b", "api_base": ollama_url}],
            }
        },
    }
    (root / "tierflow.yaml").write_text(yaml.safe_dump(config))
    (root / "agents" / "echo.yaml").write_text("name: echo\nmax_tokens: 16\n")
    steps = [
        {
            "id": f"s{i}",
            "agent": "echo",
            "tier": "light",
            "prompt": f"step {i}",
            **({"needs": [f"s{i - 1}"]} if i else {}),
        }
        for i in range(3)
    ]
    (root / "workflows" / "three.yaml").write_text(
        yaml.safe_dump({"name": "three", "steps": steps})
    )
    return root / "tierflow.yaml"


def start(
    command: list[str], cwd: Path, log: Path, ready: str, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    out = log.open("w")
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    deadline = time.monotonic() + 60
    while ready not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{command} did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=30)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: a Celery worker and its pool processes."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found.extend(process_tree(int(child)))
    return found


def tierflow_round(config: Path, runs: int) -> float:
    from sqlalchemy import func, select

    import orchestrator
    from orchestrator.settings import load_settings
    from orchestrator.store import open_store
    from orchestrator.store.tables import runs as runs_table

    clock = time.perf_counter()
    ids = [orchestrator.enqueue("three", config=str(config)) for _ in range(runs)]
    store = open_store(load_settings(config))
    query = (
        select(runs_table.c.status, func.count())
        .where(runs_table.c.id.in_(ids))
        .group_by(runs_table.c.status)
    )
    try:
        while True:
            with store.engine.connect() as connection:
                counts = dict(connection.execute(query).all())
            if counts.get("succeeded") == runs:
                break
            if counts.get("failed") or counts.get("cancelled"):
                raise SystemExit(f"a run did not succeed: {counts}")
            time.sleep(0.01)
    finally:
        store.engine.dispose()
    return runs / (time.perf_counter() - clock)


def celery_round(folder: Path, queue: str, runs: int) -> float:
    import redis
    from celery import chain

    sys.path.insert(0, str(folder))
    os.environ.update(BENCH_BROKER=BROKER, BENCH_QUEUE=queue)
    import chain_tasks  # type: ignore[import-not-found]

    key = f"bench-{uuid.uuid4().hex}"
    counter = redis.Redis.from_url(BROKER)
    clock = time.perf_counter()
    for _ in range(runs):
        chain(chain_tasks.noop.si(), chain_tasks.noop.si(), chain_tasks.done.si(key)).apply_async()
    while int(counter.get(key) or 0) < runs:
        time.sleep(0.01)
    elapsed = time.perf_counter() - clock
    counter.delete(key)
    counter.close()
    return runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database", help="ledger URL (default: SQLite in a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.testing", "ollama"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        ollama_url = server.stdout.readline().strip()
        suffix = uuid.uuid4().hex[:8]
        config = write_project(root / "project", ollama_url, args.database, f"bench-tf-{suffix}")
        (root / "chain_tasks.py").write_text(CHAIN_TASKS)
        env = {**os.environ, "BENCH_BROKER": BROKER, "BENCH_QUEUE": f"bench-raw-{suffix}"}
        worker = [
            sys.executable,
            "-m",
            "orchestrator",
            "worker",
            "--concurrency",
            "1",
            "--config",
            str(config),
        ]
        raw = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "chain_tasks",
            "worker",
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
        procs = []
        try:
            for i in range(2):
                procs.append(start(worker, root / "project", root / f"tf{i}.log", "ready.", env))
                procs.append(
                    start(
                        [*raw, f"--hostname=raw{i}@%h"], root, root / f"raw{i}.log", "ready.", env
                    )
                )
            tierflow_round(config, 4)  # warm both pools: imports, connections, first SQLite use
            celery_round(root, env["BENCH_QUEUE"], 4)
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(tierflow_round(config, args.runs))
                theirs.append(celery_round(root, env["BENCH_QUEUE"], args.runs))
            tf_rss = [rss_mb(pid) for proc in procs[0::2] for pid in process_tree(proc.pid)]
            raw_rss = [rss_mb(pid) for proc in procs[1::2] for pid in process_tree(proc.pid)]
        finally:
            stop(procs)
            server.terminate()
            server.wait()

    median_ours, median_theirs = statistics.median(ours), statistics.median(theirs)
    print(
        f"{args.runs} runs × {args.rounds} rounds, 2 workers, Redis, ledger {args.database or 'SQLite'}"
    )
    print(
        f"tierflow 3-step runs/s     median {median_ours:7.1f}   rounds {[round(x, 1) for x in ours]}"
    )
    print(
        f"raw Celery 3-task chains/s median {median_theirs:7.1f}   rounds {[round(x, 1) for x in theirs]}"
    )
    print(f"ratio (goal ≥ 0.5)          {median_ours / median_theirs:.2f}")
    print(f"tierflow worker RSS MB per process (goal ≤ 150): {[round(x) for x in tf_rss]}")
    print(f"raw Celery worker RSS MB per process:            {[round(x) for x in raw_rss]}")


if __name__ == "__main__":
    main()
