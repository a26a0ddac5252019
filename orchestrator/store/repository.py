"""The store: runs and leases, the ledger, budget counters and kept answers, over one engine.

Each concern lives in its own module (``runs``, ``calls``, ``counters``, ``answers``, ``approvals``); ``Store``
puts them together so callers hold one object. The engine is handed in.
"""

from __future__ import annotations

from sqlalchemy import Engine

from orchestrator.store.answers import AnswerStore
from orchestrator.store.approvals import ApprovalStore
from orchestrator.store.calls import CallStore
from orchestrator.store.counters import CounterStore
from orchestrator.store.runs import RunStore


class Store(RunStore, CallStore, CounterStore, AnswerStore, ApprovalStore):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
