"""The store on SQLite and PostgreSQL: migrations, atomic step records, exact money."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from conftest import make_call, make_step
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from orchestrator.errors import UserError
from orchestrator.store import Store, open_engine
from orchestrator.store.database import alembic_config, current_revision, head_revision
from orchestrator.store.tables import model_calls, step_runs


def new_run(store: Store, run_id: str = "r1") -> None:
    store.create_run(
        run_id=run_id, workflow="wf", version="1", content_hash="h" * 64, inputs={"text": "hi"}
    )


def test_migrations_reach_head_with_no_drift(store: Store) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    assert current_revision(store.engine) == head_revision()
    with store.engine.connect() as connection:
        config = alembic_config(connection)
        assert ScriptDirectory.from_config(config).get_current_head() == head_revision()
        command.check(config)  # raises if the tables and the migrations disagree


def test_unmigrated_database_is_refused_with_a_hint(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        with pytest.raises(UserError, match="tierflow db upgrade"):
            open_engine(database_url)
    else:
        with pytest.raises(UserError, match="at revision none"):
            open_engine(database_url)


def test_step_and_its_calls_are_one_transaction(store: Store) -> None:
    new_run(store)
    store.record_step(
        run_id="r1", workflow="wf", content_hash="h", record=make_step("a", [make_call(1)])
    )
    duplicate = make_step(
        "b", [make_call(1), make_call(1)]
    )  # the ledger key (run, step, attempt) repeats
    with pytest.raises(IntegrityError):
        store.record_step(run_id="r1", workflow="wf", content_hash="h", record=duplicate)
    with store.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(step_runs)).scalar() == 1
        assert connection.execute(select(func.count()).select_from(model_calls)).scalar() == 1


def test_money_is_exact_to_the_pico_dollar(store: Store) -> None:
    new_run(store)
    costs = ["0.000000000001", "0.000000123456", "12.345678901234", "0.1", "0.2"]
    calls = [make_call(i + 1, cost) for i, cost in enumerate(costs)]
    store.record_step(run_id="r1", workflow="wf", content_hash="h", record=make_step("a", calls))
    found = store.run("r1")
    assert found is not None
    assert [c["cost_usd"] for c in found["calls"]] == [Decimal(c) for c in costs]
    from orchestrator.reports import spend

    [row] = spend(store.engine, by="workflow")
    assert row.cost_usd == sum(Decimal(c) for c in costs) == Decimal("12.645679024691")


def test_run_inputs_outputs_and_status_round_trip(store: Store) -> None:
    new_run(store, "abcdef123456")
    store.finish_run("abcdef123456", status="succeeded", outputs={"a": [1, "two", None]})
    found = store.run("abcdef")  # a unique prefix is enough
    assert found is not None
    assert (found["status"], found["inputs"], found["outputs"]) == (
        "succeeded",
        {"text": "hi"},
        {"a": [1, "two", None]},
    )
    assert [r["id"] for r in store.runs(status="succeeded")] == ["abcdef123456"]
    assert store.runs(workflow="other") == []


def test_leases_fence_the_end_of_a_run(store: Store) -> None:
    store.create_run(
        run_id="r2", workflow="wf", version=None, content_hash="h", inputs={}, status="queued"
    )
    assert store.acquire_lease("r2", owner="a", ttl_s=60)
    assert not store.acquire_lease("r2", owner="b", ttl_s=60)  # a live lease is exclusive
    assert store.runs_to_publish(lease_ttl_s=0, queued_for_s=0) == []  # its lease is live
    assert not store.finish_run("r2", status="succeeded", owner="b")
    assert store.finish_run("r2", status="succeeded", owner="a")
    found = store.run("r2")
    assert found is not None and found["status"] == "succeeded" and found["lease_owner"] is None
    assert not store.acquire_lease(
        "r2", owner="a", ttl_s=60
    )  # finished runs are never leased again


def test_a_stale_lease_can_be_taken_over(store: Store) -> None:
    store.create_run(
        run_id="r3", workflow="wf", version=None, content_hash="h", inputs={}, status="queued"
    )
    assert store.acquire_lease("r3", owner="a", ttl_s=-1)  # already expired
    assert [row["id"] for row in store.runs_to_publish(lease_ttl_s=0, queued_for_s=0)] == ["r3"]
    assert store.acquire_lease("r3", owner="b", ttl_s=60)
    assert not store.renew_lease("r3", owner="a", ttl_s=60)


def test_runs_whose_message_may_be_lost_are_claimed_once_per_period(store: Store) -> None:
    store.create_run(
        run_id="q1",
        workflow="wf",
        version=None,
        content_hash="h",
        inputs={},
        status="queued",
        queue="gpu",
        time_limit_s=120.0,
    )
    assert store.runs_to_publish(lease_ttl_s=60, queued_for_s=60) == []  # just published
    time.sleep(0.05)
    [row] = store.runs_to_publish(lease_ttl_s=60, queued_for_s=0.01)
    assert (row["id"], row["queue"], row["time_limit_s"]) == ("q1", "gpu", 120.0)
    # Claiming moved its publication time to now: another sweeper does not publish it too.
    assert store.runs_to_publish(lease_ttl_s=60, queued_for_s=0.04) == []
    assert store.acquire_lease("q1", owner="w", ttl_s=60)
    assert store.hand_off("q1", owner="w", queue="cpu")
    found = store.run_row("q1")
    assert found is not None
    assert (found["status"], found["queue"], found["lease_owner"]) == ("queued", "cpu", None)
    assert not store.hand_off("q1", owner="w", queue="cpu")  # it no longer holds the run
