"""A run's lease and the fence every write of an executor passes through."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.errors import LeaseLost
from orchestrator.store import prepared
from orchestrator.store.tables import runs

# Built once: constructing a statement costs more than running it on SQLite.
_FENCE = (
    update(runs)
    .where(
        runs.c.id == bindparam("f_run_id"),
        runs.c.lease_token == bindparam("f_token"),
        runs.c.lease_owner == bindparam("f_owner"),  # None once the run ended or was handed off
    )
    .values(lease_token=runs.c.lease_token)
    .returning(runs.c.status)
)
_HOLDS = select(runs.c.status).where(
    runs.c.id == bindparam("f_run_id"),
    runs.c.lease_token == bindparam("f_token"),
    runs.c.lease_owner == bindparam("f_owner"),
)


@dataclass(frozen=True)
class Lease:
    """The right to execute ``run_id``: ``token`` grew when ``owner`` acquired it."""

    run_id: str
    owner: str
    token: int


def fence(connection: Any, lease: Lease | None) -> str | None:
    """Refuse the transaction on ``connection`` unless ``lease`` is still the run's.

    The no-op UPDATE locks the run's row (PostgreSQL) or takes SQLite's write
    lock, so no acquisition can slip in before this transaction commits. Call it
    first in every transaction that writes for an executor (or ``fence_written``
    last, in one whose first statement writes). None: an unfenced
    write (a user's cancel, a run that failed before any executor took it).
    Returns the run's status, which cannot change before the transaction ends.
    """
    return _fenced(connection, lease, _FENCE)


def fence_written(connection: Any, lease: Lease | None) -> str | None:
    """``fence`` for a transaction that has already written, called just before it commits.

    On SQLite it is a read: the transaction's first write took the database's
    write lock and a fresh snapshot, so the read sees the run as it is, and no
    acquisition can commit before this transaction does. The no-op UPDATE would
    only add a page to the commit. Elsewhere it is ``fence``: its row lock,
    held to the commit, is what orders the two, wherever it comes in the transaction.
    """
    statement = _HOLDS if connection.dialect.name == "sqlite" else _FENCE
    return _fenced(connection, lease, statement)


@contextmanager
def lost_on_conflict(engine: Any, lease: Lease | None) -> Iterator[None]:
    """Around a transaction fenced by ``fence_written``: a unique-key conflict
    before its fence means the executor that took the run over wrote that row
    first, so this one raises ``LeaseLost`` rather than the conflict.

    Enter it outside the transaction: the lease is read once that has rolled back.
    """
    try:
        yield
    except IntegrityError:
        with engine.connect() as connection:
            _fenced(connection, lease, _HOLDS)  # LeaseLost, when it is so
        raise


def _fenced(connection: Any, lease: Lease | None, statement: Any) -> str | None:
    if lease is None:
        return None
    row = prepared.execute(
        connection,
        statement,
        {"f_run_id": lease.run_id, "f_token": lease.token, "f_owner": lease.owner},
    ).fetchone()
    if row is None:
        raise LeaseLost(
            f"run {lease.run_id}: lease {lease.token} of {lease.owner} was taken over;"
            " this executor stops and writes nothing more"
        )
    return str(row[0])
