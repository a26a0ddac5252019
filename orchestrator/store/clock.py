"""The database's clock, so every host judges lease expiry by the same time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement


class db_now_s(FunctionElement[float]):
    """Seconds since the epoch, as the database server's clock has it now."""

    type = Float()
    inherit_cache = True


@compiles(db_now_s)
def _postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(db_now_s, "sqlite")
def _sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    # julianday keeps milliseconds, where strftime('%s') keeps whole seconds.
    return "((julianday('now') - 2440587.5) * 86400.0)"
