"""Engines and migrations. Tables are created only by Alembic (migrations/)."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from orchestrator.errors import UserError


def migrations_dir() -> Path:
    import orchestrator.migrations as migrations

    return Path(str(migrations.__file__)).parent


def head_revision() -> str:
    """The newest revision, read from file names (``NNNN_slug.py``) without importing alembic."""
    names = sorted(
        p.name for p in (migrations_dir() / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    )
    return names[-1].split("_", 1)[0]


def open_engine(url: str, *, migrate: bool = False) -> Engine:
    """An engine for ``url`` whose schema is at head.

    With ``migrate``, pending migrations are applied (the CLI does this for its
    SQLite file on first use). Otherwise a schema behind head is a clear error.
    """
    engine = create_engine(url, **_engine_options(url))
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "checkout", _sqlite_busy_timeout)
    try:
        current = current_revision(engine)
        if current != head_revision():
            if not migrate:
                raise UserError(
                    f"database {safe_url(url)} is at revision {current or 'none'}, not"
                    f" {head_revision()}: run 'tierflow db upgrade'"
                )
            with _migration_lock(engine):
                # Another process (two workers starting together) may have
                # migrated while this one waited for the lock.
                if current_revision(engine) != head_revision():
                    upgrade(engine)
    except OperationalError as exc:
        engine.dispose()
        raise UserError(f"database {safe_url(url)}: cannot connect: {_first_line(exc)}") from None
    except BaseException:
        engine.dispose()
        raise
    return engine


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations between processes on one machine: a lock file in the
    ``.tierflow/`` folder beside the SQLite file, one per database file."""
    database = engine.url.database
    if engine.url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        yield  # PostgreSQL: Alembic's DDL runs in one transaction there
        return
    path = Path(database)
    folder = path.parent / ".tierflow"
    folder.mkdir(exist_ok=True)
    with open(folder / f"{path.name}.migrate-lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


BUSY_TIMEOUT_MS = 30_000  # how long a SQLite write waits for another writer
_no_wait = contextvars.ContextVar("tierflow_sqlite_no_wait", default=False)


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}}
    return {"pool_pre_ping": True}


@contextlib.contextmanager
def no_wait() -> Iterator[None]:
    """SQLite connections checked out here fail at once (``is_busy``) rather than
    wait while another connection holds the write lock: for a write on the event
    loop, which must never block it. Elsewhere they wait up to BUSY_TIMEOUT_MS."""
    token = _no_wait.set(True)
    try:
        yield
    finally:
        _no_wait.reset(token)


def is_busy(exc: BaseException) -> bool:
    """True for SQLite's "database is locked": nothing was written, try again later."""
    orig = getattr(exc, "orig", None)
    return isinstance(orig, sqlite3.OperationalError) and (
        getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    )


def _sqlite_busy_timeout(connection: Any, record: Any, _proxy: Any) -> None:
    wanted = 0 if _no_wait.get() else BUSY_TIMEOUT_MS
    if record.info.get("busy_timeout") != wanted:
        connection.execute(f"PRAGMA busy_timeout={wanted}")
        record.info["busy_timeout"] = wanted


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    # WAL lets readers (reports) run beside a writer; NORMAL sync is durable
    # across process crashes, which is what a ledger on one machine needs.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def alembic_config(connection: Any = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "(unparseable database URL)"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
