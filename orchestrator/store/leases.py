"""A run's lease and the fence every write of an executor passes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, update

from orchestrator.errors import LeaseLost
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
    first in every transaction that writes for an executor. None: an unfenced
    write (a user's cancel, a run that failed before any executor took it).
    Returns the run's status, which cannot change before the transaction ends.
    """
    if lease is None:
        return None
    status = connection.execute(
        _FENCE, {"f_run_id": lease.run_id, "f_token": lease.token, "f_owner": lease.owner}
    ).scalar()
    if status is None:
        raise LeaseLost(
            f"run {lease.run_id}: lease {lease.token} of {lease.owner} was taken over;"
            " this executor stops and writes nothing more"
        )
    return str(status)
