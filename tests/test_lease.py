"""The heartbeat that keeps runs' leases: it outlives a database outage shorter than the
TTL, and one thread keeps every lease of a process fresh."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Project, kill, start_run, tiers_for, wait_for, write_two_steps
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from orchestrator.client import Client
from orchestrator.store import open_engine
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

# Renewals come every TTL/3 and the heartbeat gives up at 0.8 TTL: the outage
# (TTL/4) plus one renewal interval, plus reconnecting on a loaded machine, must
# stay well inside that, or the test measures the load instead of the retry.
TTL_S = 9.0


def refuse_connections(url: str, refuse: bool) -> None:
    """Close every session of the database at ``url`` and refuse new ones, or allow them again."""
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="test"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {not refuse}'))
            if refuse:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
    finally:
        admin.dispose()


def runs(project: Project) -> list[dict[str, Any]]:
    store = project.store()
    try:
        return store.runs()
    finally:
        store.engine.dispose()


def test_the_lease_outlives_a_database_outage_shorter_than_its_ttl(
    tmp_path: Path, postgres_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(
        tmp_path,
        {
            "tiers": tiers_for(ollama, frontier, timeout_s=60),
            "lease_ttl_s": TTL_S,
            "database": postgres_url,
        },
    )
    write_two_steps(project)
    open_engine(postgres_url, migrate=True).dispose()
    asked: list[str] = []

    def answer(body: dict) -> Reply:
        asked.append(body["messages"][-1]["content"])
        return Reply(text="ok", delay_s=4 * TTL_S if asked[-1] == "first" else 0)

    ollama.responder = answer
    proc = start_run(project, "two")
    try:
        wait_for(lambda: asked == ["first"])
        refuse_connections(postgres_url, True)  # every renewal fails for a while
        time.sleep(TTL_S / 4)
        refuse_connections(postgres_url, False)
        # Well past the TTL from the last renewal before the outage, the step still
        # waits on its model: a heartbeat that gave up would have let the lease go stale.
        time.sleep(TTL_S)
        [run] = runs(project)
        assert asked == ["first"] and (run["status"], run["stale"]) == ("running", False)
        assert proc.wait(timeout=60) == 0
    finally:
        refuse_connections(postgres_url, False)
        kill(proc)
    [run] = runs(project)
    assert run["status"] == "succeeded"
    assert project.ledger_states() == [("first", 1, "settled"), ("second", 1, "settled")]


def test_one_thread_keeps_every_lease_of_a_process_fresh(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    ttl_s = 3.0
    project = Project(
        tmp_path, {"tiers": tiers_for(ollama, frontier, timeout_s=60), "lease_ttl_s": ttl_s}
    )
    write_two_steps(project)
    slow = 2.5 * ttl_s  # each run's first step outlasts its lease's TTL

    def answer(body: dict) -> Reply:
        return Reply(text="ok", delay_s=slow if body["messages"][-1]["content"] == "first" else 0)

    ollama.responder = answer

    async def side_by_side() -> tuple[list[Any], list[dict[str, Any]], list[str]]:
        client = Client(config=project.config)
        try:
            started = [asyncio.ensure_future(client.arun("two")) for _ in range(3)]
            await asyncio.sleep(ttl_s * 1.7)  # past the TTL: only renewals keep them live
            midway = client.store.runs()
            return await asyncio.gather(*started), midway, new_threads()
        finally:
            await client.aclose()

    before = set(threading.enumerate())  # earlier tests' heartbeats serve other stores

    def new_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t not in before and "lease" in t.name]

    results, midway, threads = asyncio.run(side_by_side())
    assert [(run["status"], run["stale"], run["lease_token"]) for run in midway] == [
        ("running", False, 1)
    ] * 3
    assert threads == ["tierflow-leases"]  # not one a run
    assert [result.status for result in results] == ["succeeded"] * 3
    # With no lease left to keep, the thread ends: a client thrown away leaves none.
    wait_for(lambda: not new_threads())
