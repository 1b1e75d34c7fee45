"""Order webhooks as Salla sends them (`order.created`, `order.updated`,
`order.status.updated`), built for a store, an order and a moment: the ledger tests' input."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

#: How Salla writes `created_at` (JavaScript's Date string, Riyadh time).
JS = "%a %b %d %Y %H:%M:%S GMT+0300"


def order_body(
    event: str,
    merchant: int,
    order_id: int,
    status: str,
    total: int,
    at: int,
    *,
    customer: int,
    history: int = 0,
) -> bytes:
    """`at`: epoch seconds; `history`: the status change's id (`order.status.updated`)."""
    stamp = dt.datetime.fromtimestamp(at, dt.timezone(dt.timedelta(hours=3))).strftime(JS)
    order = {
        "id": order_id,
        "reference_id": order_id + 100,
        "status": {"slug": status},
        "amounts": {"total": {"amount": total}},
        "customer": {"id": customer},
    }
    data: dict[str, Any] = (
        {"id": history, "status": status, "order": order}
        if event == "order.status.updated"
        else order
    )
    doc = {"event": event, "merchant": merchant, "created_at": stamp, "data": data}
    return json.dumps(doc).encode()
