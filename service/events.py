"""Salla payload → the normalised context rules read. Pure: data in, data out.

Salla's event shapes differ (`order.status.updated` carries the order at `data.order`, the other
order events at `data`; `review.added` sends numbers as strings). Everything is parsed here, once,
so a rule's `order.status` and `order.total` mean the same thing for every event.
Amounts are `Decimal`; ids are integers (0 when absent). In a webhook (`normalise`), an id that
is present but is not an id (`"١٢٣"`, `"²"`, `-5`, `"abc"`) raises `InvalidPayload`: guessing
would credit the wrong order or customer, and trying again cannot help, so the worker rejects
the event (`event_rejected`). In an order read from Salla's API it reads as absent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from service.errors import InvalidPayload
from service.ids import WHAT_AN_ID_IS, parse_id
from service.webhooks import Envelope

ZERO = Decimal(0)

#: App lifecycle events the service keeps (service/lifecycle.py handles each; the trial events
#: of `webhooks.APP_EVENTS` are ignored); the web sends them to their own job, never to the
#: inbox.
# duplicates: webhooks.APP_EVENTS lists these and the trial events Salla also sends (the
# names the edge knows); these are the ones the service keeps.
LIFECYCLE_EVENTS = frozenset(
    {
        "app.store.authorize",
        "app.installed",
        "app.updated",
        "app.uninstalled",
        "app.settings.updated",
    }
)

#: Order status slugs Salla documents; anything else is logged and treated like any other value.
KNOWN_ORDER_STATUSES = frozenset(
    {
        "payment_pending",
        "under_review",
        "in_progress",
        "completed",
        "delivering",
        "delivered",
        "shipped",
        "canceled",
        "restored",
        "restoring",
        "waiting_for_payment_confirmation",
        "payment_failed",
        "waiting to receive it",
    }
)


@dataclass(frozen=True, slots=True)
class Customer:
    id: int = 0
    name: str = ""
    email: str = ""
    groups: tuple[int, ...] = ()
    country: str = ""
    city: str = ""
    gender: str = ""
    #: 1-12, or 0 when the payload has no birthday.
    birthday_month: int = 0
    birthday_day: int = 0


@dataclass(frozen=True, slots=True)
class Item:
    id: int = 0
    product_id: int = 0
    name: str = ""
    sku: str = ""
    quantity: Decimal = ZERO
    total: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class Order:
    id: int = 0
    reference_id: str = ""
    status: str = ""
    payment_method: str = ""
    source: str = ""
    currency: str = ""
    total: Decimal = ZERO
    sub_total: Decimal = ZERO
    shipping: Decimal = ZERO
    tax: Decimal = ZERO
    discount: Decimal = ZERO
    loyalty_prize: Decimal = ZERO
    items: tuple[Item, ...] = ()
    #: Salla has recorded a completion (`first_complete_at`), this snapshot says `completed`,
    #: or any event of the order showed `completed` (the worker adds what the ledger saw).
    completed_once: bool = False


@dataclass(frozen=True, slots=True)
class Review:
    id: int = 0
    type: str = ""
    rating: Decimal = ZERO
    content: str = ""
    product_id: int = 0
    order_id: int = 0


@dataclass(frozen=True, slots=True)
class EventContext:
    """What a rule sees. Every part is present; absent parts hold empty values (ids are 0).

    `settings` holds the store's settings (typed per rule set, see `service.rules.model`) and
    `now` is in the rule set's timezone once `service.rules.engine.prepare` has run.
    """

    event: str
    merchant: int
    now: dt.datetime
    order: Order = field(default_factory=Order)
    customer: Customer = field(default_factory=Customer)
    review: Review = field(default_factory=Review)
    settings: Any = None

    @property
    def has_order(self) -> bool:
        return self.order.id != 0


def to_decimal(value: object) -> Decimal:
    """Salla amounts come as numbers, strings ("5.00") or `{"amount": ..}`; absent means 0."""
    if isinstance(value, Mapping):
        value = value.get("amount")
    if isinstance(value, bool) or value is None:
        return ZERO
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        try:
            parsed = Decimal(value.strip().replace(",", ""))
        except InvalidOperation:
            return ZERO
        return parsed if parsed.is_finite() else ZERO
    return ZERO


def _id(value: object, where: str | None) -> int:
    """The id at `where` in a webhook's payload: 0 when absent (missing, null, "", 0), else an
    id, or `InvalidPayload` naming the field. `where` None (an order read from Salla's API, not
    a webhook): anything that is not an id reads as absent, as it always has there."""
    if value is None or (not isinstance(value, bool) and value in (0, "", "0")):
        return 0
    parsed = parse_id(value)
    if parsed is None and where is None:
        return 0
    if parsed is None:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}..."
        raise InvalidPayload(f"{where} is {shown}, not an id ({WHAT_AN_ID_IS})")
    return parsed


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return ""


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _birthday(raw: object) -> tuple[int, int]:
    """Salla sends `{"date": "1997-06-03 00:00:00.000000", ...}` or a plain date string."""
    text = _text(_mapping(raw).get("date") if isinstance(raw, Mapping) else raw)
    if len(text) < 10:
        return 0, 0
    try:
        day = dt.date.fromisoformat(text[:10])
    except ValueError:
        return 0, 0
    return day.month, day.day


def parse_customer(raw: object, where: str | None = None) -> Customer:
    doc = _mapping(raw)
    birthday_month, birthday_day = _birthday(doc.get("birthday"))
    groups_raw = doc.get("groups")
    groups = tuple(
        g
        for g in (
            _id(x, where and f"{where}.groups[]")
            for x in (groups_raw if isinstance(groups_raw, list) else [])
        )
        if g
    )
    return Customer(
        id=_id(doc.get("id"), where and f"{where}.id"),
        name=_text(doc.get("name") or doc.get("first_name")),
        email=_text(doc.get("email")),
        groups=groups,
        country=_text(doc.get("country")),
        city=_text(doc.get("city")),
        gender=_text(doc.get("gender")),
        birthday_month=birthday_month,
        birthday_day=birthday_day,
    )


#: Salla's `{"date": "2022-08-17 23:59:36.000000", "timezone": "Asia/Riyadh"}` date shape.
_SALLA_ZONES: dict[str, dt.tzinfo] = {}


def salla_date_ms(raw: object) -> int:
    """Epoch ms of a Salla date object (or plain "YYYY-mm-dd HH:MM:SS" text, read as Riyadh
    time, the stores' zone); 0 when absent or unreadable."""
    if not raw:
        return 0
    doc = _mapping(raw)
    text = _text(doc.get("date") if isinstance(raw, Mapping) else raw).strip()
    if len(text) < 19:
        return 0
    zone_name = _text(doc.get("timezone")) or "Asia/Riyadh"
    zone = _SALLA_ZONES.get(zone_name)
    if zone is None:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            zone = ZoneInfo("Asia/Riyadh")
        _SALLA_ZONES[zone_name] = zone
    try:
        moment = dt.datetime.fromisoformat(text[:19])
    except ValueError:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return int(moment.timestamp() * 1000)


def order_doc(envelope: Envelope) -> Mapping[str, Any]:
    """The order object of an order event, wherever the event's shape puts it."""
    if envelope.event == "order.status.updated":
        return _mapping(envelope.data.get("order"))
    return _mapping(envelope.data) if envelope.event.startswith("order.") else {}


def parse_order(raw: object, where: str | None = None) -> Order:
    doc = _mapping(raw)
    amounts = _mapping(doc.get("amounts"))
    status = doc.get("status")
    slug = _text(_mapping(status).get("slug")) if isinstance(status, Mapping) else _text(status)
    discounts = amounts.get("discounts")
    discount_list = (
        [d for d in discounts if isinstance(d, Mapping)] if isinstance(discounts, list) else []
    )
    items_raw = doc.get("items")
    items = tuple(
        Item(
            id=_id(it.get("id"), where and f"{where}.items[].id"),
            product_id=_id(
                it.get("product_id") or _mapping(it.get("product")).get("id"),
                where and f"{where}.items[].product.id",
            ),
            name=_text(it.get("name")),
            sku=_text(it.get("sku")).strip(),
            quantity=to_decimal(it.get("quantity")),
            total=to_decimal(_mapping(it.get("amounts")).get("total")),
        )
        for it in (items_raw if isinstance(items_raw, list) else [])
        if isinstance(it, Mapping)
    )
    total_raw = amounts.get("total") if "total" in amounts else doc.get("total")
    return Order(
        id=_id(doc.get("id"), where and f"{where}.id"),
        reference_id=_text(doc.get("reference_id")),
        status=slug.strip().lower(),
        payment_method=_text(doc.get("payment_method")),
        source=_text(doc.get("source")),
        currency=_text(doc.get("currency")),
        total=to_decimal(total_raw),
        sub_total=to_decimal(amounts.get("sub_total")),
        shipping=to_decimal(amounts.get("shipping_cost")),
        tax=to_decimal(_mapping(amounts.get("tax")).get("amount")),
        discount=sum((to_decimal(d.get("discount")) for d in discount_list), ZERO),
        loyalty_prize=sum(
            (
                to_decimal(d.get("discount"))
                for d in discount_list
                if d.get("type") == "loyalty_prize"
            ),
            ZERO,
        ),
        items=items,
        completed_once=slug.strip().lower() == "completed"
        or salla_date_ms(doc.get("first_complete_at")) > 0,
    )


def normalise(envelope: Envelope, now: dt.datetime | None = None) -> EventContext:
    """Build the rule context for any Salla event; unknown shapes give empty parts, not errors."""
    now = now or dt.datetime.now(dt.UTC)
    data = envelope.data
    event = envelope.event
    order = Order()
    customer = Customer()
    review = Review()
    if event == "order.status.updated":
        order = parse_order(data.get("order"), "data.order")
        customer = parse_customer(
            _mapping(data.get("order")).get("customer"), "data.order.customer"
        )
    elif event.startswith("order."):
        order = parse_order(data, "data")
        customer = parse_customer(data.get("customer"), "data.customer")
    elif event.startswith("customer."):
        customer = parse_customer(data, "data")
    elif event.startswith("review."):
        reviewed = _mapping(data.get("order"))
        product = _mapping(data.get("product"))
        review = Review(
            id=_id(data.get("id"), "data.id"),
            type=_text(data.get("type")),
            rating=to_decimal(data.get("rating")),
            content=_text(data.get("content")),
            product_id=_id(product.get("id"), "data.product.id"),
            order_id=_id(reviewed.get("id"), "data.order.id"),
        )
        order = Order(
            id=review.order_id,
            reference_id=_text(reviewed.get("reference_id")),
            total=to_decimal(reviewed.get("total")),
        )
        customer = parse_customer(data.get("customer"), "data.customer")
    return EventContext(
        event=event,
        merchant=envelope.merchant,
        now=now,
        order=order,
        customer=customer,
        review=review,
    )
