"""Keeping runs' leases while their executors work, from a thread beside the loop.

The heartbeat runs beside the event loop, so neither store I/O, a template, nor an
in-process model on the loop can starve it. It renews each lease every third of
its TTL and looks at the run's status twice a second, so a cancel stops the
work within a second. A database error is retried until the lease would expire;
only then, or when another executor holds a newer token, is the lease lost.

One thread serves every lease of a store, each on its own schedule: a run
starts no thread of its own (starting one cost about 0.3 ms a run).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from orchestrator.store import Lease, Store

log = logging.getLogger("tierflow.lease")
POLL_S = 0.5  # how often the run's status is read: a cancel is seen within this
RETRY_S = 0.1  # the wait before retrying a failed renewal
MARGIN = 0.8  # give up when this share of the TTL has passed since the last renewal
IDLE_S = 5.0  # a heartbeat with no lease to keep for this long ends its thread


class LeaseKeeper:
    """Renews ``lease`` from ``start`` until ``stop``; calls ``on_stop`` once, from the
    heartbeat's thread, when the run was cancelled or the lease was lost. ``lost``
    then says why; ``cancelled`` is set for a cancel."""

    def __init__(
        self, store: Store, lease: Lease, *, ttl_s: float, on_stop: Callable[[], object]
    ) -> None:
        self._store = store
        self._lease = lease
        self._ttl = ttl_s
        self._on_stop = on_stop
        self._interval = min(POLL_S, ttl_s / 3)
        self._done = threading.Event()
        self._renewed = 0.0
        self.lost: str | None = None
        self.cancelled = False

    def start(self) -> LeaseKeeper:
        self._renewed = time.monotonic()  # the lease was acquired (or renewed) just before
        _Heartbeat.of(self._store).keep(self, self._renewed + self._interval)
        return self

    def stop(self) -> None:
        self._done.set()
        _Heartbeat.of(self._store).drop(self)

    @property
    def run_id(self) -> str:
        return self._lease.run_id

    @property
    def stopped(self) -> bool:
        return self._done.is_set()

    def beat(self) -> float | None:
        """Renew the lease if a third of its TTL has passed, else read the run's
        status. Returns when the next beat is due, or None once this keeper is done."""
        if self._done.is_set():
            return None
        began = time.monotonic()
        try:
            if began - self._renewed >= self._ttl / 3:
                status = self._store.renew_lease(self._lease, ttl_s=self._ttl)
                if status is None:
                    self._stop(lost="another executor took the run over")
                    return None
                self._renewed = began
            else:
                status = self._store.status_of(self._lease.run_id)
        except Exception as exc:  # a locked or unreachable database: try again soon
            if time.monotonic() - self._renewed >= self._ttl * MARGIN:
                self._stop(lost=f"the lease could not be renewed: {type(exc).__name__}")
                return None
            log.warning("run %s: lease renewal failed, retrying: %s", self._lease.run_id, exc)
            return time.monotonic() + RETRY_S
        if status == "cancelled" and not self.cancelled:
            self._stop(cancelled=True)  # the lease is kept while the run winds down
        return time.monotonic() + self._interval

    def _stop(self, *, lost: str | None = None, cancelled: bool = False) -> None:
        if lost is not None:
            log.warning("run %s: lease lost: %s", self._lease.run_id, lost)
        self.lost, self.cancelled = lost, cancelled
        if not self._done.is_set():
            self._on_stop()


class _Heartbeat:
    """The thread that beats for every ``LeaseKeeper`` of one store, each when it is due.

    Per store, so that one database's outage cannot delay another's renewals.
    The thread starts with the first lease kept, waits for work between runs,
    and ends after IDLE_S with none (a client thrown away leaves no thread). A
    forked process forgets its parent's heartbeats and starts its own.
    """

    def __init__(self) -> None:
        self._due: dict[LeaseKeeper, float] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, store: Store) -> _Heartbeat:
        with _heartbeats_lock:
            heartbeat = _heartbeats.get(store)
            if heartbeat is None:
                heartbeat = _heartbeats[store] = cls()
            return heartbeat

    def keep(self, keeper: LeaseKeeper, due: float) -> None:
        with self._changed:
            self._due[keeper] = due
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="tierflow-leases", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def drop(self, keeper: LeaseKeeper) -> None:
        with self._changed:
            self._due.pop(keeper, None)

    def _run(self) -> None:
        while (keeper := self._next_due()) is not None:
            try:
                due = keeper.beat()  # store I/O, outside the lock
            except Exception:  # its on_stop failed (its loop closed?): the others go on
                log.exception("run %s: the lease heartbeat failed", keeper.run_id)
                due = None
            with self._changed:
                if due is not None and not keeper.stopped:  # else stop() came meanwhile
                    self._due[keeper] = due

    def _next_due(self) -> LeaseKeeper | None:
        """The keeper whose beat is due, once it is; None when the thread should end."""
        with self._changed:
            while True:
                if not self._due:
                    if not self._changed.wait(IDLE_S) and not self._due:
                        self._thread = None  # keep() starts another
                        return None
                    continue
                keeper, due = min(self._due.items(), key=lambda item: item[1])
                wait = due - time.monotonic()
                if wait <= 0:
                    del self._due[keeper]
                    return keeper
                self._changed.wait(wait)


_heartbeats: weakref.WeakKeyDictionary[Store, _Heartbeat] = weakref.WeakKeyDictionary()
_heartbeats_lock = threading.Lock()


def _forget_after_fork() -> None:
    """In a forked child: the parent's heartbeat threads did not come along, and
    their locks may have been held at the fork."""
    global _heartbeats, _heartbeats_lock
    _heartbeats = weakref.WeakKeyDictionary()
    _heartbeats_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
