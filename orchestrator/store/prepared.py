"""The ledger's hot statements, run straight through SQLite's cursor.

Every step writes two short transactions (its call pending, then its record
with the call settled). On SQLite, SQLAlchemy's own work for each execution
(cache key, execution context, result object) costs several times what SQLite
does (measured here: about 55 µs a statement against 8 µs), and the ledger
was most of tierflow's overhead per step. ``execute`` compiles a Core statement
once for the set of parameter names it is given and converts each parameter
with its column type's own bind processor, so the row written is the one
SQLAlchemy would write. The statement runs inside the caller's SQLAlchemy
transaction, on its connection. Other databases go through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable

# Each parameter: its name in the caller's mapping (None for a value fixed in
# the statement, such as ``state == "pending"``), that value, and its processor.
_Parameter = tuple[str | None, Any, Callable[[Any], Any] | None]
_Compiled = tuple[str, tuple[_Parameter, ...]]
_compiled: dict[tuple[Executable, frozenset[str]], _Compiled] = {}


def execute(connection: Connection, statement: Executable, params: Mapping[str, Any]) -> Any:
    """Run ``statement`` (built once, at import) with ``params`` in the connection's transaction.

    Returns a cursor: ``rowcount`` and ``fetchone()`` (a row indexable by position).
    Errors are SQLAlchemy's, as from ``connection.execute``.
    """
    if connection.dialect.name != "sqlite":
        return connection.execute(statement, params)
    sql, parameters = _compile(connection, statement, params)
    values = []
    for name, fixed, process in parameters:
        value = fixed if name is None else params[name]
        values.append(value if process is None else process(value))
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    try:
        return driver.execute(sql, values)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, values, exc, sqlite3.Error) from exc


def _compile(connection: Connection, statement: Executable, params: Mapping[str, Any]) -> _Compiled:
    key = (statement, frozenset(params))
    found = _compiled.get(key)
    if found is None:
        dialect = connection.dialect
        compiled: Any = cast(Any, statement).compile(dialect=dialect, column_keys=list(params))
        parameters = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            if bind.expanding:  # IN (...) is rendered per execution; use connection.execute
                raise TypeError(f"{name}: a statement with IN cannot be prepared")
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if name in params:
                parameters.append((name, None, process))
            else:
                parameters.append((None, bind.effective_value, process))
        found = _compiled[key] = (compiled.string, tuple(parameters))
    return found
