"""Shared fixtures: loopback model servers, throwaway projects, and databases.

A test that needs a service it cannot reach is skipped here, with the reason,
and fails instead when CI=true: CI must never pass by skipping.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from orchestrator.ledger import Call, StepRecord
from orchestrator.runner import Runner, RunResult
from orchestrator.settings import load_settings
from orchestrator.spec import LoadedWorkflow, find_workflow, load_workflow
from orchestrator.store import Store, open_store
from orchestrator.store.tables import budget_usage, model_calls
from orchestrator.testing import OllamaServer, OpenAIServer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get(
    "TIERFLOW_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REPO = Path(__file__).resolve().parent.parent


def missing_service(reason: str) -> None:
    """Skip locally; fail in CI, where every service must be present."""
    if IN_CI:
        pytest.fail(f"CI requires it: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach a real provider: keys from the developer's shell are hidden.
    for name in (
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "TIERFLOW_CONFIG",
        "TIERFLOW_DATABASE_URL",
        "OLLAMA_HOST",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def ollama() -> Iterator[OllamaServer]:
    with OllamaServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def frontier() -> Iterator[OpenAIServer]:
    with OpenAIServer() as server:
        yield server  # type: ignore[misc]


def tiers_for(
    ollama: OllamaServer, frontier: OpenAIServer, *, timeout_s: float = 5
) -> dict[str, Any]:
    return {
        "light": {
            "local": True,
            "models": [
                {"model": "ollama/llama3.2:1b", "api_base": ollama.url, "timeout_s": timeout_s}
            ],
        },
        "frontier": {
            "models": [
                {
                    "model": "openai/gpt-4o-mini",
                    "api_base": f"{frontier.url}/v1",
                    "timeout_s": timeout_s,
                }
            ],
        },
    }


class Project:
    """A throwaway tierflow project on disk: tierflow.yaml, agents/ and workflows/."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        (root / "agents").mkdir(parents=True, exist_ok=True)
        (root / "workflows").mkdir(exist_ok=True)
        config.setdefault("database", f"sqlite:///{root / 'tierflow.db'}")
        config.setdefault("reference_model", "openai/gpt-4.1")
        self.write("tierflow.yaml", config)
        self.agent("helper", system="You help.", prompt="{{ inputs.text }}", max_tokens=64)

    @property
    def config(self) -> Path:
        return self.root / "tierflow.yaml"

    def write(self, name: str, data: dict[str, Any] | str) -> Path:
        path = self.root / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return path

    def agent(self, name: str, **fields: Any) -> Path:
        return self.write(f"agents/{name}.yaml", {"name": name, **fields})

    def workflow(self, data: dict[str, Any]) -> Path:
        data.setdefault("inputs", {"text": {"type": "string", "default": "hello"}})
        return self.write(f"workflows/{data['name']}.yaml", data)

    def runner(
        self, name: str, *, tiers: list[str] | None = None
    ) -> tuple[Runner, LoadedWorkflow, Store]:
        """A runner serving ``tiers`` on this project's store, and the loaded workflow ``name``.

        The caller disposes of ``store.engine``.
        """
        settings = load_settings(self.config)
        loaded = load_workflow(find_workflow(name, settings), settings)
        store = self.store()
        return Runner(settings=settings, store=store, tiers=tiers), loaded, store

    def run(self, name: str, inputs: dict[str, Any] | None = None) -> RunResult:
        runner, loaded, store = self.runner(name)
        try:
            return asyncio.run(runner.run(loaded, inputs or {}))
        finally:
            store.engine.dispose()

    def store(self) -> Store:
        return open_store(load_settings(self.config))

    def ledger_states(self) -> list[tuple[str, int, str]]:
        """(step, attempt, state) of every ledger row, in the order written."""
        store = self.store()
        try:
            with store.engine.connect() as connection:
                query = select(
                    model_calls.c.step_id, model_calls.c.attempt, model_calls.c.state
                ).order_by(model_calls.c.id)
                return [(row[0], row[1], row[2]) for row in connection.execute(query)]
        finally:
            store.engine.dispose()

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        """The run's step rows, as ``tierflow show --json`` gives them."""
        store = self.store()
        try:
            found = store.run(run_id)
        finally:
            store.engine.dispose()
        assert found is not None
        return found["steps"]

    def calls(self, run_id: str) -> list[dict[str, Any]]:
        store = self.store()
        try:
            found = store.run(run_id)
        finally:
            store.engine.dispose()
        assert found is not None
        return found["calls"]


@pytest.fixture
def project(tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer) -> Project:
    return Project(tmp_path / "project", {"tiers": tiers_for(ollama, frontier)})


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"tierflow_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        missing_service(f"PostgreSQL unreachable at {POSTGRES_URL}: {str(exc).splitlines()[0]}")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated store on each database: SQLite, then PostgreSQL."""
    from orchestrator.store import open_engine

    engine = open_engine(database_url, migrate=True)
    yield Store(engine)
    engine.dispose()


def write_two_steps(project: Project) -> None:
    """Workflow ``two``: step ``first``, then ``second``, on the light tier."""
    project.workflow(
        {
            "name": "two",
            "steps": [
                {"id": "first", "agent": "helper", "tier": "light", "prompt": "first"},
                {
                    "id": "second",
                    "agent": "helper",
                    "tier": "light",
                    "needs": ["first"],
                    "prompt": "second",
                },
            ],
        }
    )


def tierflow(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def start_run(project: Project, workflow: str) -> subprocess.Popen[bytes]:
    """``tierflow run WORKFLOW`` in a process group of its own, for ``kill``."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", workflow],
        cwd=project.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and its children, if it still runs, and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def killed_mid_call(project: Project, workflow: str, step: str) -> str:
    """Start ``tierflow run WORKFLOW``, SIGKILL it once ``step``'s first call is
    pending (its request is at the model); the run's id."""
    proc = start_run(project, workflow)
    try:
        wait_for(lambda: (step, 1, "pending") in project.ledger_states())
    finally:
        kill(proc)
    [run] = project.store().runs()
    return str(run["id"])


def wait_for(predicate: Callable[[], bool], *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def statuses(records: list[StepRecord]) -> dict[str, str]:
    return {record.step_id: record.status for record in records}


def make_call(attempt: int, cost: str = "0.000000123456", **fields: Any) -> Call:
    """A ledger row as the scheduler makes one: light tier, gpt-4o-mini, ok, now."""
    values: dict[str, Any] = {
        "attempt": attempt,
        "item_index": None,
        "tier_asked": "light",
        "tier_used": "light",
        "model": "openai/gpt-4o-mini",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": Decimal(cost),
        "reference_cost_usd": Decimal("0.00006"),
        "latency_ms": 1.5,
        "outcome": "ok",
        "error": None,
        "escalation_reason": None,
        "created_at": datetime.now(UTC),
    }
    values.update(fields)
    return Call(**values)


def make_step(step_id: str, calls: list[Call], **fields: Any) -> StepRecord:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "step_id": step_id,
        "agent": "helper",
        "status": "succeeded",
        "output": {"x": 1},
        "error": None,
        "tier_asked": "light",
        "started_at": now,
        "finished_at": now,
        "calls": calls,
    }
    values.update(fields)
    return StepRecord(**values)


ESCALATED = "light/ollama/llama3.2:1b: invalid_output: not JSON"


def seed_ledger(store: Store) -> None:
    """Runs of two workflows (two versions of one) over 40 days, through the Store API.

    Steps escalate from light to frontier, one model is skipped as unavailable,
    costs run from one pico-dollar to dollars, and one row has no reference cost.
    Names carry markup and quotes: to a report they are data.
    """
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    plan = [
        ("triage", "1", 0, "0.000000000001"),
        ("triage", "1", 1, "0.25"),
        ("triage", "2", 0, "1.000000000003"),
        ("triage", "2", 5, "0.000123456789"),
        ("<b>report</b> 'x'", None, 2, "3.5"),
        ("<b>report</b> 'x'", None, 40, "0.75"),
    ]
    for number, (workflow, version, days_ago, cost) in enumerate(plan):
        run_id = f"run{number:03d}" + "0" * 26
        content_hash = f"{version or 0:0>64}"  # the file's content hash: one per version
        when = today - timedelta(days=days_ago)
        store.create_run(
            run_id=run_id,
            workflow=workflow,
            version=version,
            content_hash=content_hash,
            inputs={"text": "hi"},
            status="succeeded",
        )
        cheap = make_call(  # answered, but not JSON: the step went on up the ladder
            1,
            "0",
            created_at=when,
            model="ollama/llama3.2:1b",
            prompt_tokens=100 + number,
            outcome="invalid_output",
        )
        skipped = make_call(
            2,
            "0",
            created_at=when,
            model="ollama/qwen2.5:7b",
            tier_used="standard",
            outcome="unavailable",
            prompt_tokens=0,
            completion_tokens=0,
            escalation_reason=ESCALATED,
        )
        dear = make_call(
            3,
            cost,
            created_at=when,
            tier_used="frontier",
            completion_tokens=7 * number,
            escalation_reason=ESCALATED,
            reference_cost_usd=None if number == 3 else Decimal("2.000000000007"),
        )
        first = make_step("classify", [make_call(1, "0.000001", created_at=when)])
        second = make_step("answer", [cheap, skipped, dear])
        for record in (first, second):
            store.record_step(
                run_id=run_id, workflow=workflow, content_hash=content_hash, record=record
            )


# $1 per 1K prompt tokens and $2 per 1K completion tokens on the frontier model.
PRICES = {"openai/gpt-4o-mini": {"input": 1000, "output": 2000}}


def frontier_project(
    root: Path,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    workflow_budget: dict[str, Any],
    **config: Any,
) -> Project:
    """Workflow ``ask``: one frontier step, under ``workflow_budget``."""
    project = Project(
        root, {"tiers": tiers_for(ollama, frontier, timeout_s=30), "prices": PRICES, **config}
    )
    project.agent("brief", prompt="{{ inputs.text }}", max_tokens=10)
    project.workflow(
        {
            "name": "ask",
            "budget": workflow_budget,
            "steps": [{"id": "answer", "agent": "brief", "tier": "frontier"}],
        }
    )
    return project


def ledger(project: Project) -> list[dict[str, Any]]:
    store = project.store()
    try:
        with store.engine.connect() as connection:
            return [dict(row) for row in connection.execute(select(model_calls)).mappings()]
    finally:
        store.engine.dispose()


def counters(project: Project) -> dict[str, tuple[Decimal, Decimal]]:
    store = project.store()
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(select(budget_usage)).all()
    finally:
        store.engine.dispose()
    return {key: (spent, reserved) for key, spent, reserved in rows}


def assert_nothing_reserved(project: Project) -> None:
    """The invariant after any end of a run: no call is left pending, and no budget
    counter holds a reservation (what pending calls hold is zero)."""
    assert [row for row in ledger(project) if row["state"] == "pending"] == []
    assert all(reserved == 0 for _, reserved in counters(project).values()), counters(project)
