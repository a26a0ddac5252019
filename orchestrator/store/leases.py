"""A run's lease and the fence every write of an executor passes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from orchestrator.errors import LeaseLost
from orchestrator.store.tables import runs


@dataclass(frozen=True)
class Lease:
    """The right to execute ``run_id``: ``token`` grew when ``owner`` acquired it."""

    run_id: str
    owner: str
    token: int


def fence(connection: Any, lease: Lease | None) -> None:
    """Refuse the transaction on ``connection`` unless ``lease`` is still the run's.

    The no-op UPDATE locks the run's row (PostgreSQL) or takes SQLite's write
    lock, so no acquisition can slip in before this transaction commits. Call it
    first in every transaction that writes for an executor. None: an unfenced
    write (a user's cancel, a run that failed before any executor took it).
    """
    if lease is None:
        return
    held = connection.execute(
        update(runs)
        .where(
            runs.c.id == lease.run_id,
            runs.c.lease_token == lease.token,
            runs.c.lease_owner == lease.owner,  # None once the run ended or was handed off
        )
        .values(lease_token=runs.c.lease_token)
    )
    if held.rowcount != 1:
        raise LeaseLost(
            f"run {lease.run_id}: lease {lease.token} of {lease.owner} was taken over;"
            " this executor stops and writes nothing more"
        )
