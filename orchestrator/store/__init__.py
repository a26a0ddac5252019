"""The SQL store: tables, migrations and the queries the rest of tierflow runs."""

from __future__ import annotations

from orchestrator.store.calls import Checkpoint
from orchestrator.store.database import open_engine
from orchestrator.store.leases import Lease
from orchestrator.store.repository import Store

__all__ = ["Checkpoint", "Lease", "Store", "open_engine"]
