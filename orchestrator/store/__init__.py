"""The SQL store: tables, migrations and the queries the rest of tierflow runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.store.calls import Checkpoint
from orchestrator.store.database import open_engine
from orchestrator.store.leases import Lease
from orchestrator.store.repository import Store

if TYPE_CHECKING:
    from orchestrator.settings import Settings

__all__ = ["Checkpoint", "Lease", "Store", "open_engine", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store for ``settings``; a SQLite database is migrated on first use."""
    url = settings.database_url
    return Store(open_engine(url, migrate=url.startswith("sqlite")))
