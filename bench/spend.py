"""How fast spend reports are over a million ledger rows, on SQLite and on PostgreSQL.

Seeds 1,000,000 ledger rows (200,000 runs of 50 workflows over 90 days) by bulk
insert (executemany on SQLite, COPY on PostgreSQL; seeding is not timed), then
times, as medians of several rounds after a warm-up:

- ``reports.report(by="workflow")`` and ``reports.report(by="day", since=30d)``:
  what ``tierflow spend --by workflow`` and ``--by day --since 30d`` call;
- the baseline, measured in the same run through the same engine: a raw
  ``SELECT workflow, sum(cost_usd) ... GROUP BY workflow`` (and by day);
- ``GET /spend`` for both, and the dashboard, against a real ``tierflow serve``;
- the real ``tierflow spend`` command once each (interpreter start included).

    python bench/spend.py [--rows 1000000] [--rounds 5] [--databases sqlite,postgresql]

Goal: each report ≤ 1 s. PostgreSQL is at TIERFLOW_TEST_DATABASE_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test); a scratch database is
created there and dropped afterwards.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and bench/queue.py
# would shadow the standard library's ``queue``, which litellm and kombu import.
sys.path = [entry for entry in sys.path if not entry.endswith("bench")]

import argparse
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import Engine, create_engine, text

from orchestrator import reports
from orchestrator.store import open_engine

WORKFLOWS = 50
DAYS = 90
CALLS_PER_RUN = 5
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POSTGRES_URL = os.environ.get(
    "TIERFLOW_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RUN_COLUMNS = (
    "id",
    "workflow",
    "workflow_version",
    "workflow_hash",
    "status",
    "inputs",
    "created_at",
)
CALL_COLUMNS = (
    "run_id", "step_id", "attempt", "workflow", "workflow_hash", "agent", "tier_asked",
    "tier_used", "model", "prompt_tokens", "completion_tokens", "cost_usd",
    "reference_cost_usd", "latency_ms", "outcome", "state", "escalation_reason",
    "created_at", "day",
)  # fmt: skip
# (tier, model, USD per token in and out); the reference is gpt-4.1's $2 / $8 per 1M.
TIERS = [
    ("light", "ollama/llama3.2:1b", 0, 0),
    ("standard", "openai/gpt-4o-mini", 150_000, 600_000),  # pico-dollars per token
    ("frontier", "anthropic/claude-sonnet-4-5", 3_000_000, 15_000_000),
]
REFERENCE = (2_000_000, 8_000_000)


def ledger(rows: int, seed: int = 7) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]:
    """Runs and their calls: four steps each; one run in four escalates its last step."""
    rng = random.Random(seed)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for number in range(rows // CALLS_PER_RUN):
        workflow = f"wf-{number % WORKFLOWS:02d}"
        version = str(1 + (number // WORKFLOWS) % 3)
        created = today - timedelta(days=rng.randrange(DAYS), seconds=rng.randrange(86_400))
        run_id = f"{number:032x}"
        content_hash = f"{version:0>64}"
        run = (run_id, workflow, version, content_hash, "succeeded", "{}", created)
        calls = []
        escalates = number % 4 == 0
        steps = [("s0", 1), ("s1", 1), ("s2", 1), ("s3", 1)]
        steps.append(("s3", 2) if escalates else ("s4", 1))
        for step, attempt in steps:
            asked = 0 if step in ("s0", "s1") else 1
            tier, model, price_in, price_out = TIERS[2 if attempt == 2 else asked]
            prompt, completion = rng.randrange(50, 4000), rng.randrange(10, 800)
            reason = "light/ollama/llama3.2:1b: invalid_output: not JSON" if attempt == 2 else None
            calls.append(
                (
                    run_id, step, attempt, workflow, content_hash, "agent", TIERS[asked][0], tier,
                    model, prompt, completion, prompt * price_in + completion * price_out,
                    prompt * REFERENCE[0] + completion * REFERENCE[1], 12.5,
                    "ok", "settled", reason, created, created.date(),
                )
            )  # fmt: skip
        yield run, calls


def batches(rows: int, size: int = 10_000) -> Iterator[tuple[list[Any], list[Any]]]:
    runs: list[Any] = []
    calls: list[Any] = []
    for run, run_calls in ledger(rows):
        runs.append(run)
        calls.extend(run_calls)
        if len(calls) >= size:
            yield runs, calls
            runs, calls = [], []
    if calls:
        yield runs, calls


def seed_sqlite(engine: Engine, rows: int) -> None:
    """executemany through the raw sqlite3 connection, in SQLAlchemy's storage formats."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        for runs, calls in batches(rows):
            cursor.executemany(
                f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                [(*run[:-1], _sqlite_time(run[-1])) for run in runs],
            )
            cursor.executemany(
                f"INSERT INTO model_calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))})",
                [(*call[:-2], _sqlite_time(call[-2]), call[-1].isoformat()) for call in calls],
            )
        connection.commit()
    finally:
        connection.close()


def _sqlite_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def seed_postgresql(engine: Engine, rows: int) -> None:
    """COPY through psycopg, then VACUUM ANALYZE as autovacuum would after a bulk load."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        for runs, calls in batches(rows, size=100_000):
            with cursor.copy(f"COPY runs ({', '.join(RUN_COLUMNS)}) FROM STDIN") as copy:
                for run in runs:
                    copy.write_row(run)
            with cursor.copy(f"COPY model_calls ({', '.join(CALL_COLUMNS)}) FROM STDIN") as copy:
                for call in calls:
                    copy.write_row(call)
        connection.commit()
    finally:
        connection.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as autocommit:
        autocommit.execute(text("VACUUM ANALYZE runs"))
        autocommit.execute(text("VACUUM ANALYZE model_calls"))


def median_ms(work: Callable[[], Any], rounds: int) -> float:
    work()  # warm-up: connections, statement caches, the OS page cache
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def raw_query(engine: Engine, sql: str, **params: Any) -> Callable[[], Any]:
    def run() -> Any:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).all()

    return run


def measure(name: str, url: str, rows: int, rounds: int, folder: Path) -> list[str]:
    engine = open_engine(url, migrate=True)
    start = time.perf_counter()
    (seed_sqlite if name == "sqlite" else seed_postgresql)(engine, rows)
    seeded = time.perf_counter() - start
    since = reports.parse_when("30d")
    with engine.connect() as connection:
        count = connection.execute(text("SELECT count(*) FROM model_calls")).scalar_one()
    lines = [f"## {name}: {count:,} ledger rows (seeded in {seeded:.1f} s)"]

    baseline_workflow = median_ms(
        raw_query(engine, "SELECT workflow, sum(cost_usd) FROM model_calls GROUP BY workflow"),
        rounds,
    )
    baseline_day = median_ms(
        raw_query(
            engine,
            "SELECT day, sum(cost_usd) FROM model_calls WHERE day >= :since GROUP BY day",
            since=since,
        ),
        rounds,
    )
    figures = [
        ("raw SQL sum by workflow (baseline)", baseline_workflow, baseline_workflow),
        ("raw SQL sum by day since 30d (baseline)", baseline_day, baseline_day),
    ]
    for label, by, day_since, baseline in (
        ("report --by workflow", "workflow", None, baseline_workflow),
        ("report --by day --since 30d", "day", since, baseline_day),
        ("report --by version", "version", None, baseline_workflow),
        ("report --by step", "step", None, baseline_workflow),
        ("report --top 10 (steps)", None, None, baseline_workflow),
    ):
        top = 10 if by is None else None
        elapsed = median_ms(
            lambda by=by, day_since=day_since, top=top: reports.report(
                engine, by=by, since=day_since, top=top
            ),
            rounds,
        )
        figures.append((label, elapsed, baseline))

    config = folder / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": url,
                "tiers": {"light": {"models": ["llamacpp/smollm2-135m"], "local": True}},
            }
        )
    )
    with serve(config) as base, httpx.Client(base_url=base, headers=AUTH, timeout=60) as client:
        for label, params, baseline in (
            ("GET /spend?by=workflow", {"by": "workflow"}, baseline_workflow),
            ("GET /spend?by=day&since=30d", {"by": "day", "since": "30d"}, baseline_day),
        ):
            elapsed = median_ms(
                lambda params=params: client.get("/spend", params=params).raise_for_status(),
                rounds,
            )
            figures.append((label, elapsed, baseline))
        client.get("/", params={"token": TOKEN}, follow_redirects=True).raise_for_status()
        elapsed = median_ms(lambda: client.get("/").raise_for_status(), rounds)
        figures.append(("GET / (dashboard, 30 days)", elapsed, baseline_workflow))
    for label, args, baseline in (
        ("tierflow spend --by workflow (once)", ["--by", "workflow"], baseline_workflow),
        (
            "tierflow spend --by day --since 30d (once)",
            ["--by", "day", "--since", "30d"],
            baseline_day,
        ),
    ):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "spend",
                "--config",
                str(config),
                "--json",
                *args,
            ],
            check=True,
            capture_output=True,
        )
        figures.append((label, (time.perf_counter() - start) * 1000, baseline))
    engine.dispose()

    lines.append(f"{'what':<46} {'median ms':>10} {'× baseline':>11}")
    for label, elapsed, baseline in figures:
        lines.append(f"{label:<46} {elapsed:>10.1f} {elapsed / baseline:>11.2f}")
    return lines


class serve:
    """``tierflow serve`` in a subprocess on a free loopback port."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def __enter__(self) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "serve",
                "--port",
                str(port),
                "--config",
                str(self.config),
            ],
            env={**os.environ, "TIERFLOW_API_TOKEN": TOKEN},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return f"http://127.0.0.1:{port}"
            time.sleep(0.05)
        raise RuntimeError("tierflow serve did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def postgres_database() -> tuple[str, Callable[[], None]]:
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"tierflow_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin.url.set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    print(f"today {date.today()}, {args.rounds} rounds after a warm-up; goal ≤ 1000 ms per report")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for name in args.databases.split(","):
            if name == "sqlite":
                lines = measure(
                    name, f"sqlite:///{folder / 'bench.db'}", args.rows, args.rounds, folder
                )
            else:
                url, drop = postgres_database()
                try:
                    lines = measure(name, url, args.rows, args.rounds, folder)
                finally:
                    drop()
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
