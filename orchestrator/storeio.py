"""Store work from the event loop, which it must never stall.

``off_loop`` runs a blocking store call in a thread. ``write`` is for the
writes of every step (a call's pending row, a step's record): on SQLite it
first tries the write on the loop with ``no_wait``, which takes a fraction of
a millisecond when no other connection is writing (a hop to a thread and back
costs about as much again), and goes to a thread, which may wait for the lock,
only when another writer holds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError

from orchestrator.store import Store
from orchestrator.store.database import is_busy, no_wait

_T = TypeVar("_T")


async def write(store: Store, transaction: Callable[[], _T]) -> _T:
    """The result of ``transaction``: one store transaction, so that a try
    refused for a busy lock wrote nothing and may be made again."""
    if store.engine.dialect.name == "sqlite":
        try:
            with no_wait():
                return transaction()
        except OperationalError as exc:
            if not is_busy(exc):
                raise
    return await off_loop(transaction)


async def off_loop(call: Callable[[], _T]) -> _T:
    """The result of a blocking store ``call``, run in a thread so it never stalls the loop.

    A cancel that arrives meanwhile waits for the call to finish, and is then
    raised (or the call's own error, such as ``LeaseLost``): what the write did
    is always known before the caller moves on.
    """
    future = asyncio.get_running_loop().run_in_executor(None, call)
    interrupted = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
        raise asyncio.CancelledError
    return future.result()
