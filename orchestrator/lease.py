"""Keeping a run's lease while its executor works, from a thread of its own.

The heartbeat runs beside the event loop, so neither store I/O, a template, nor an
in-process model on the loop can starve it. It renews the lease every third of
its TTL and looks at the run's status twice a second, so a cancel stops the
work within a second. A database error is retried until the lease would expire;
only then, or when another executor holds a newer token, is the lease lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from orchestrator.store import Lease, Store

log = logging.getLogger("tierflow.lease")
POLL_S = 0.5  # how often the run's status is read: a cancel is seen within this
RETRY_S = 0.1  # the wait before retrying a failed renewal
MARGIN = 0.8  # give up when this share of the TTL has passed since the last renewal


class LeaseKeeper:
    """Renews ``lease`` until ``stop``; calls ``on_stop`` once, from its thread, when
    the run was cancelled or the lease was lost. ``lost`` then says why; ``cancelled``
    is set for a cancel."""

    def __init__(
        self, store: Store, lease: Lease, *, ttl_s: float, on_stop: Callable[[], object]
    ) -> None:
        self._store = store
        self._lease = lease
        self._ttl = ttl_s
        self._on_stop = on_stop
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._keep, name=f"tierflow-lease-{lease.run_id[:8]}", daemon=True
        )
        self.lost: str | None = None
        self.cancelled = False

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _keep(self) -> None:
        renewed = time.monotonic()  # the lease was acquired (or renewed) just before
        wait = min(POLL_S, self._ttl / 3)
        while not self._done.wait(wait):
            began = time.monotonic()
            try:
                if began - renewed >= self._ttl / 3:
                    status = self._store.renew_lease(self._lease, ttl_s=self._ttl)
                    if status is None:
                        self._stop(lost="another executor took the run over")
                        return
                    renewed = began
                else:
                    status = self._store.status_of(self._lease.run_id)
            except Exception as exc:  # a locked or unreachable database: try again soon
                if time.monotonic() - renewed >= self._ttl * MARGIN:
                    self._stop(lost=f"the lease could not be renewed: {type(exc).__name__}")
                    return
                log.warning("run %s: lease renewal failed, retrying: %s", self._lease.run_id, exc)
                wait = RETRY_S
                continue
            wait = min(POLL_S, self._ttl / 3)
            if status == "cancelled" and not self.cancelled:
                self._stop(cancelled=True)

    def _stop(self, *, lost: str | None = None, cancelled: bool = False) -> None:
        if lost is not None:
            log.warning("run %s: lease lost: %s", self._lease.run_id, lost)
        self.lost, self.cancelled = lost, cancelled
        if not self._done.is_set():
            self._on_stop()
