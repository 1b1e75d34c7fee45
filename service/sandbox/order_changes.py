"""One change to a store's orders, and the webhooks a Salla store sends for it.

    new order                       order.created          (the order at `data`)
    status changed                  order.status.updated   (`data.id` the status-history id,
                                                           `data.status` the Arabic name, the
                                                           order at `data.order`), and
                                                           order.cancelled too when the order
                                                           becomes canceled and that is asked for
    total, customer, payment method order.updated          (the order at `data`)
    or reference changed, same status
    deleted                         order.deleted          (the order as it was, at `data`)

A change that changes nothing sends nothing. The caller holds the sandbox's lock; the webhooks
are logged and routed through their switches here, and sent by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.sandbox import orders
from service.sandbox.state import Counters, Store
from service.sandbox.webhooks_out import (
    Outbox,
    Outgoing,
    Switches,
    build,
    envelope_time,
    parse_switches,
)

#: What `change_order` (and `POST /_sandbox/orders`) accepts beside merchant and order_id.
CHANGE_FIELDS = frozenset(
    {"status", "total", "customer_id", "reference_id", "payment_method", "note", "date", "webhook"}
)


@dataclass
class Prepared:
    """A change made; its webhooks logged and routed, `to_send` still to send."""

    answer: dict[str, Any]
    items: list[Outgoing] = field(default_factory=list)
    to_send: list[tuple[Outgoing, Switches]] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        """`{"order": ..., "webhooks": [log entries as they are now]}`."""
        return {**self.answer, "webhooks": [dict(item.entry) for item in self.items]}


def change(
    store: Store,
    counters: Counters,
    outbox: Outbox,
    order_id: int | None,
    fields: Mapping[str, Any],
) -> Prepared:
    """Create the order (unknown or no `order_id`) or change it; `ValueError` for bad input."""
    unknown = sorted(set(fields) - CHANGE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {sorted(CHANGE_FIELDS)}")
    switches = parse_switches(fields.get("webhook"))
    order_id, wanted = orders.parse_change({**fields, "order_id": order_id})
    now = time.time()
    order = store.orders.get(order_id) if order_id is not None else None
    _check_reference(store, wanted.reference_id, order)
    events: list[tuple[str, dict[str, Any]]] = []
    if order is None:
        order = orders.create(
            order_id or _new_order_id(store, counters),
            store.next_reference_id,
            wanted,
            now,
            _next_history_id(counters),
        )
        store.next_reference_id = max(store.next_reference_id, order.reference_id) + 1
        store.orders[order.id] = order
        store.count("orders_created")
        events.append(("order.created", orders.render(order)))
    else:
        fields_changed, entry = orders.apply(order, wanted, now, lambda: _next_history_id(counters))
        if entry is not None:
            events.append(("order.status.updated", orders.status_updated_data(order, entry)))
            also_cancelled = (
                store.order_cancelled_event
                if switches.order_cancelled is None
                else switches.order_cancelled
            )
            if order.status == "canceled" and also_cancelled:
                events.append(("order.cancelled", orders.render(order)))
        elif fields_changed:
            events.append(("order.updated", orders.render(order)))
    store.known_customers.add(order.customer_id)
    prepared = _webhooks(store, counters, outbox, order, events, switches, now)
    prepared.answer = {"order": orders.render(order)}
    return prepared


def delete(
    store: Store,
    counters: Counters,
    outbox: Outbox,
    order_id: int | None,
    webhook: Mapping[str, Any] | None,
) -> Prepared:
    """Forget the order and send `order.deleted`; `LookupError` when there is no such order."""
    switches = parse_switches(webhook)
    order = store.orders.pop(order_id, None) if order_id is not None else None
    if order is None:
        raise LookupError(f"store {store.merchant} has no order {order_id}")
    store.count("orders_deleted")
    doc = orders.render(order)
    prepared = _webhooks(
        store, counters, outbox, order, [("order.deleted", doc)], switches, time.time()
    )
    prepared.answer = {"order": doc, "deleted": True}
    return prepared


def _webhooks(
    store: Store,
    counters: Counters,
    outbox: Outbox,
    order: orders.Order,
    events: list[tuple[str, dict[str, Any]]],
    switches: Switches,
    now: float,
) -> Prepared:
    """Build, log and route the webhooks of one change."""
    prepared = Prepared(answer={})
    for event, data in events:
        created_at = (
            switches.created_at
            or (switches.same_second and order.last_webhook_created_at)
            or envelope_time(now)
        )
        order.last_webhook_created_at = created_at
        counters.webhook_seq += 1
        item = build(store, counters.webhook_seq, event, order.id, created_at, data)
        prepared.items.append(item)
        if outbox.route(item, switches):
            prepared.to_send.append((item, switches))
    return prepared


def _check_reference(store: Store, reference_id: int | None, order: orders.Order | None) -> None:
    if reference_id is None:
        return
    for other in store.orders.values():
        if other.reference_id == reference_id and other is not order:
            raise ValueError(f"reference_id {reference_id} is already order {other.id}'s")


def _new_order_id(store: Store, counters: Counters) -> int:
    counters.order_seq += 1
    while counters.order_seq in store.orders:
        counters.order_seq += 1
    return counters.order_seq


def _next_history_id(counters: Counters) -> int:
    counters.history_seq += 1
    return counters.history_seq
