"""The store on SQLite and PostgreSQL: migrations, atomic step records, exact money."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from conftest import make_call, make_step
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from orchestrator.errors import LeaseLost, UserError
from orchestrator.ledger import ToolRun
from orchestrator.store import Lease, Store, open_engine
from orchestrator.store.counters import Limit, scope_keys
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


def test_the_hot_path_writes_the_rows_sqlalchemy_would(store: Store) -> None:
    """Calls and steps go straight to SQLite's cursor (store.prepared); every
    column must read back as the same row written through SQLAlchemy does."""
    from orchestrator.store import prepared
    from orchestrator.store.calls import _INSERT_CALL, _call_row

    new_run(store)
    call = make_call(
        1, "0.000000123457", reserved_usd=Decimal("0.25"), local=True, usage_source="reported"
    )
    step = make_step("a", [call], output={"nested": [1, "two", None]})
    store.record_step(run_id="r1", workflow="wf", content_hash="h", record=step)
    row = _call_row("r1", "wf", "h", step, call, accepted=True)
    columns = {key: value for key, value in row.items() if not key.startswith("b_")}
    with store.engine.begin() as connection:
        connection.execute(_INSERT_CALL, {**columns, "step_id": "by-sqlalchemy"})
        if store.engine.dialect.name == "sqlite":  # elsewhere it is connection.execute
            with pytest.raises(TypeError, match="IN cannot be prepared"):
                prepared.execute(
                    connection,
                    select(model_calls.c.id).where(model_calls.c.outcome.in_(["ok"])),
                    {},
                )
    with store.engine.connect() as connection:
        ours, theirs = (
            connection.execute(select(model_calls).where(model_calls.c.step_id == step_id))
            .mappings()
            .one()
            for step_id in ("a", "by-sqlalchemy")
        )
        steps = connection.execute(select(step_runs.c.output, step_runs.c.started_at)).all()
    differ = {key for key in ours if key not in ("id", "step_id") and ours[key] != theirs[key]}
    assert not differ, {key: (ours[key], theirs[key]) for key in differ}
    assert ours["cost_usd"] == Decimal("0.000000123457") and ours["local"] is True
    assert steps == [({"nested": [1, "two", None]}, steps[0][1])]
    started = steps[0][1]  # SQLite keeps no zone; the store writes UTC
    assert (started if started.tzinfo else started.replace(tzinfo=UTC)) == step.started_at


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


def test_a_run_is_named_by_a_unique_prefix_of_four_or_more(store: Store) -> None:
    new_run(store, "abcdef123456")
    new_run(store, "abcdff654321")
    assert store.named_run_id("abcde") == "abcdef123456"
    for given, said in (
        ("abcd", "run id prefix 'abcd' names several runs: give more of it"),
        ("abc", "no run 'abc' (a run id prefix takes at least 4 characters)"),
        ("zzzz", "no run 'zzzz'"),
    ):
        with pytest.raises(UserError) as raised:
            store.named_run_id(given)
        assert str(raised.value) == said


def queued_run(store: Store, run_id: str) -> None:
    store.create_run(
        run_id=run_id, workflow="wf", version=None, content_hash="h", inputs={}, status="queued"
    )


def test_a_live_lease_is_exclusive_and_finished_runs_are_never_leased(store: Store) -> None:
    queued_run(store, "r2")
    lease = store.acquire_lease("r2", owner="a", ttl_s=60)
    assert lease is not None and lease.token == 1
    assert store.acquire_lease("r2", owner="b", ttl_s=60) is None  # a live lease is exclusive
    assert store.runs_to_publish(lease_ttl_s=0, queued_for_s=0) == []  # its lease is live
    assert store.finish_run("r2", status="succeeded", lease=lease) == "succeeded"
    found = store.run("r2")
    assert found is not None and found["status"] == "succeeded" and found["lease_owner"] is None
    assert store.acquire_lease("r2", owner="a", ttl_s=60) is None


def test_every_write_of_a_stale_lease_is_refused(store: Store) -> None:
    queued_run(store, "r3")
    old = store.acquire_lease("r3", owner="a", ttl_s=-1)  # expired at once, by the database's clock
    assert old is not None
    assert [row["id"] for row in store.runs_to_publish(lease_ttl_s=0, queued_for_s=0)] == ["r3"]
    new = store.acquire_lease("r3", owner="b", ttl_s=60)
    assert new is not None and new.token == old.token + 1
    assert store.renew_lease(old, ttl_s=60) is None
    step = make_step("a", [make_call(1)])
    writes = {
        "record_step": lambda lease: store.record_step(
            run_id="r3", workflow="wf", content_hash="h", record=step, lease=lease
        ),
        "open_call": lambda lease: store.open_call(
            run_id="r3",
            workflow="wf",
            content_hash="h",
            agent="helper",
            step_id="b",
            call=make_call(1, outcome="pending"),
            lease=lease,
        ),
        "open_tool_call": lambda lease: store.open_tool_call(
            run_id="r3", step_id="b", run=make_tool_run(), lease=lease
        ),
        "prepare_resume": lambda lease: store.prepare_resume(lease),
        "hand_off": lambda lease: store.hand_off(lease, queue="cpu"),
        "finish_run": lambda lease: store.finish_run("r3", status="failed", lease=lease),
    }
    for name, write in writes.items():
        with pytest.raises(LeaseLost):
            write(old)
        found = store.run("r3")
        assert found is not None
        assert (found["status"], found["steps"], found["calls"]) == ("running", [], []), name
        assert found["tools"] == [], name  # a tool refused its row never runs
    store.record_step(run_id="r3", workflow="wf", content_hash="h", record=step, lease=new)
    writes["open_call"](new)
    for name in ("record_step", "open_call"):  # their rows now exist: still LeaseLost, no conflict
        with pytest.raises(LeaseLost):
            writes[name](old)
    assert store.finish_run("r3", status="succeeded", lease=new) == "succeeded"
    with pytest.raises(LeaseLost):  # an ended run takes no more writes, even from its holder
        store.record_step(
            run_id="r3", workflow="wf", content_hash="h", record=make_step("c", []), lease=new
        )


def make_tool_run() -> ToolRun:
    """A tool call as the tool loop writes it before the tool runs."""
    return ToolRun(
        attempt=1,
        item_index=None,
        name="lookup_order",
        outcome="running",
        duration_ms=0.0,
        arguments_bytes=17,
        result_bytes=0,
        error=None,
        created_at=datetime.now(UTC),
    )


def test_a_cancel_during_the_last_step_is_never_overwritten_by_success(store: Store) -> None:
    queued_run(store, "r4")
    lease = store.acquire_lease("r4", owner="a", ttl_s=60)
    assert lease is not None
    assert store.cancel_run("r4") == "cancelled"
    assert store.finish_run("r4", status="succeeded", outputs={"x": 1}, lease=lease) == "cancelled"
    found = store.run("r4")
    assert found is not None and (found["status"], found["outputs"]) == ("cancelled", None)


def pending_call(store: Store, run_id: str, lease: Lease | None, limit: Limit) -> None:
    refused = store.open_call(
        run_id=run_id,
        workflow="wf",
        content_hash="h",
        agent="helper",
        step_id="a",
        call=make_call(1, "0.25", outcome="pending", reserved_usd=Decimal("0.25")),
        limits=[limit],
        lease=lease,
    )
    assert refused is None


def daily_limit() -> Limit:
    key = scope_keys("", "wf", datetime.now(UTC).date())[3]  # every workflow, today
    return Limit(key=key, usd=Decimal(10), label="global daily budget", own=False)


def counter(store: Store, limit: Limit) -> tuple[Decimal, Decimal]:
    return store.usage([limit.key])[limit.key]


@pytest.mark.parametrize("executor_alive", [True, False])
def test_no_reservation_outlives_a_cancelled_run(store: Store, executor_alive: bool) -> None:
    limit = daily_limit()
    queued_run(store, "r5")
    lease = store.acquire_lease("r5", owner="a", ttl_s=60 if executor_alive else -1)
    pending_call(store, "r5", lease, limit)
    assert counter(store, limit) == (Decimal(0), Decimal("0.25"))
    assert store.cancel_run("r5") == "cancelled"
    if executor_alive:  # the executor records what it cut off; until then the call is pending
        assert counter(store, limit) == (Decimal(0), Decimal("0.25"))
        store.finish_run("r5", status="cancelled", lease=lease)
    # The call may have been billed: its worst case moves from reserved to spent.
    assert counter(store, limit) == (Decimal("0.25"), Decimal(0))
    [call] = store.run("r5")["calls"]  # type: ignore[index]
    assert call["state"] == "abandoned"


@pytest.mark.parametrize("ended_by", ["cancel", "failure"])
def test_a_run_that_does_not_succeed_claims_no_savings(store: Store, ended_by: str) -> None:
    queued_run(store, "r7")
    lease = store.acquire_lease("r7", owner="a", ttl_s=-1)  # its executor died
    assert lease is not None
    answer = make_call(1, "0.00002")
    store.record_step(
        run_id="r7", workflow="wf", content_hash="h", record=make_step("a", [answer]), lease=lease
    )
    [row] = store.run("r7")["calls"]  # type: ignore[index]
    assert row["reference_cost_usd"] == Decimal("0.00006")  # an accepted answer, while it lasts
    if ended_by == "cancel":
        assert store.cancel_run("r7") == "cancelled"
    else:
        store.finish_run("r7", status="failed", error="a later step failed", lease=lease)
    [row] = store.run("r7")["calls"]  # type: ignore[index]
    assert row["reference_cost_usd"] == row["cost_usd"] == Decimal("0.00002")


def test_a_sweeper_ends_the_calls_of_a_cancelled_run_whose_executor_died(store: Store) -> None:
    limit = daily_limit()
    queued_run(store, "r6")
    lease = store.acquire_lease("r6", owner="a", ttl_s=0.3)
    pending_call(store, "r6", lease, limit)
    assert store.cancel_run("r6") == "cancelled"  # its executor was alive then, and then died
    assert store.abandon_orphans() == 0  # its lease is still live
    time.sleep(0.4)
    assert store.abandon_orphans() == 1
    assert counter(store, limit) == (Decimal("0.25"), Decimal(0))


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
    lease = store.acquire_lease("q1", owner="w", ttl_s=60)
    assert lease is not None
    assert store.hand_off(lease, queue="cpu")
    found = store.run_row("q1")
    assert found is not None
    assert (found["status"], found["queue"], found["lease_owner"]) == ("queued", "cpu", None)
    with pytest.raises(LeaseLost):  # it no longer holds the run
        store.hand_off(lease, queue="cpu")


def test_a_steps_routing_history_merges_calls_and_labels_by_time(store: Store) -> None:
    """On both databases: newest first, labels among calls in their place, the
    newest label per answer, and labelled passes turned into costs only."""
    from datetime import timedelta

    start = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def routed(attempt: int, tier: str, outcome: str, minutes: int, cost: str) -> Any:
        return make_call(
            attempt,
            cost,
            tier_used=tier,
            outcome=outcome,
            route_key="k" * 16,
            latency_ms=float(attempt),
            created_at=start + timedelta(minutes=minutes),
        )

    # r1: light failed, frontier passed; labelled bad twice, then good (newest wins).
    new_run(store, "r1")
    first = [routed(1, "light", "low_confidence", 0, "0"), routed(2, "frontier", "ok", 1, "0.25")]
    store.record_step(run_id="r1", workflow="wf", content_hash="h", record=make_step("a", first))
    # r2: light passed, unlabelled, later than every label of r1 but one.
    new_run(store, "r2")
    second = [routed(1, "light", "ok", 10, "0.000000000001")]
    store.record_step(run_id="r2", workflow="wf", content_hash="h", record=make_step("a", second))
    for good in (False, False, True):
        store.add_feedback("r1", "a", good=good, note=None)
    history = store.route_history(workflow="wf", step_id="a", route_key="k" * 16, limit=10)
    # Labels are written now (after every call): they come first, one for r1.
    assert history == [
        ("frontier", "good", 0.0, 0.0),
        ("light", "ok", 1e-12, 1.0),
        ("frontier", "labelled", 0.25, 2.0),
        ("light", "low_confidence", 0.0, 1.0),
    ]
    assert (
        store.route_history(workflow="wf", step_id="a", route_key="k" * 16, limit=2) == history[:2]
    )
