"""How records are written out: JSON for machines, money for people.

The command line, the HTTP API and the dashboard share these, so they agree.
In JSON and CSV, money stays exact: a ``Decimal`` becomes its plain decimal
string (``0``, ``0.000021``; never ``0E-9``), and dates and times become ISO 8601.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def json_default(value: Any) -> Any:
    """``json.dumps`` ``default=`` for the values our records hold."""
    if isinstance(value, Decimal):
        return money(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def dumps(data: Any, *, indent: int | None = None) -> str:
    return json.dumps(data, indent=indent, default=json_default)


def money(value: Decimal) -> str:
    """Exact USD as a plain decimal string, for JSON: ``0.1``, ``100``, never ``1E+2``."""
    return format(value.normalize(), "f")


def usd(value: Decimal | None) -> str:
    """Money for people: ``$0``, ``$0.000562`` below a dollar, ``$1,234.5678`` above."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    sign, size = ("-" if value < 0 else ""), abs(value)
    return f"{sign}${size:.6f}" if size < 1 else f"{sign}${size:,.4f}"
