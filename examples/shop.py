"""A toy order book for the support-agent example: a tool a model may call."""

from __future__ import annotations

ORDERS = {
    "A1001": {"status": "shipped", "carrier": "DHL", "eta": "2026-12-08"},
    "A1002": {"status": "packing", "carrier": None, "eta": "2026-12-10"},
}


def lookup_order(order_id: str) -> dict[str, object]:
    """Look an order up by its id (like A1001): its status, carrier and expected delivery."""
    found = ORDERS.get(order_id.strip().upper())
    if found is None:
        raise KeyError(f"no order {order_id}")
    return {"order_id": order_id, **found}
