"""A store's orders as the sandbox keeps them, and their Salla shapes. Pure: no I/O.

An order is kept as a small record (`Order`, with its status history) and rendered on demand in
the shapes Salla's Admin API and webhooks use (FACTS sections 2 and 4.1, `data.order` of the
published `order.status.updated`): `render` for Order Details and `order.*` webhooks,
`list_item` for List Orders (no customer), `history_item` for the histories endpoint, and
`status_updated_data` for the `data` of `order.status.updated`.

Times are epoch seconds in the records and `{"date": "YYYY-mm-dd HH:MM:SS.000000",
"timezone_type": 3, "timezone": "Asia/Riyadh"}` in the shapes, as Salla writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from service.ids import parse_id

RIYADH = ZoneInfo("Asia/Riyadh")
CURRENCY = "SAR"
#: The customer of Salla's published `order.status.updated` sample: the demo store's default.
DEMO_CUSTOMER = 1779795066


# duplicates: a frozen record like admin.replay.StoredWebhook; only the dataclass shape is shared.
@dataclass(frozen=True, slots=True)
class Status:
    slug: str
    id: int
    customized_id: int
    name: str


#: One status per documented slug. Ids are per store in Salla; these are stable numbers (the
#: published samples' where they show one). Names are Arabic, as Salla sends them; never key on
#: them (Salla's own names differ between endpoints).
STATUSES: dict[str, Status] = {
    s.slug: s
    for s in (
        # duplicates: a table, one row per status (each row alike by design).
        Status("payment_pending", 349994915, 349994916, "بإنتظار الدفع"),
        Status("under_review", 566146469, 986688842, "بإنتظار المراجعة"),
        Status("in_progress", 1956875584, 1956875585, "قيد التنفيذ"),
        Status("completed", 1298199463, 1298199464, "مكتمل"),
        Status("delivering", 1938110066, 1938110067, "جاري التوصيل"),
        Status("delivered", 1014452495, 1014452496, "تم التوصيل"),
        Status("shipped", 165947469, 165947470, "تم الشحن"),
        Status("canceled", 525144736, 687926769, "ملغي"),
        Status("restored", 1548352431, 1548352432, "مسترجع"),
        Status("restoring", 814202285, 814202286, "قيد الإسترجاع"),
        Status("waiting_for_payment_confirmation", 2046281006, 2046281007, "بإنتظار تأكيد الدفع"),
        Status("payment_failed", 1401961380, 1401961381, "فشل الدفع"),
        Status("waiting to receive it", 1830357467, 1830357468, "بإنتظار الاستلام"),
    )
}
DEFAULT_STATUS = "under_review"
DEFAULT_TOTAL = Decimal(100)


class HistoryEntry(msgspec.Struct):
    """One status change. `id` comes from the sandbox-wide counter, so it rises with time."""

    id: int
    slug: str
    note: str
    at_s: float


class Order(msgspec.Struct):
    id: int
    reference_id: int
    status: str
    total: Decimal
    customer_id: int
    payment_method: str
    source: str
    created_s: float
    updated_s: float
    first_complete_s: float | None = None
    #: Oldest first.
    histories: list[HistoryEntry] = []
    #: The envelope `created_at` of the last webhook about this order (`same_second` reuses it).
    last_webhook_created_at: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """What `POST /_sandbox/orders` asks for; None leaves a field as it is."""

    status: str | None = None
    total: Decimal | None = None
    customer_id: int | None = None
    reference_id: int | None = None
    payment_method: str | None = None
    note: str | None = None
    #: The creation time, for a new order only (epoch seconds).
    created_s: float | None = None


def _positive_int(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"'{key}' must be a positive integer")
    parsed = parse_id(value)
    if parsed is None:
        raise ValueError(f"'{key}' must be a positive integer")
    return parsed


def parse_total(value: object) -> Decimal:
    """ "154.00", 154 or 154.5: a non-negative amount with at most two decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("'total' must be an amount such as \"154.00\"")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError("'total' must be an amount such as \"154.00\"") from None
    if not amount.is_finite() or amount < 0 or amount != amount.quantize(Decimal("0.01")):
        raise ValueError("'total' must be a non-negative amount with at most two decimals")
    return amount.quantize(Decimal("0.01"))


def parse_local_time(text: object) -> float:
    """ "YYYY-mm-dd HH:MM:SS" (or just the date) in Riyadh time → epoch seconds."""
    if not isinstance(text, str):
        raise ValueError("'date' must be a string 'YYYY-mm-dd HH:MM:SS' (Riyadh time)")
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("'date' must be 'YYYY-mm-dd HH:MM:SS' (Riyadh time)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=RIYADH)
    return moment.timestamp()


def parse_change(doc: Mapping[str, Any]) -> tuple[int | None, Change]:
    """`(order_id, change)` from a control request body; `ValueError` says what is wrong."""
    status = doc.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"unknown status {status!r}; known: {', '.join(STATUSES)}")
    payment = doc.get("payment_method")
    if payment is not None and (not isinstance(payment, str) or not 0 < len(payment) <= 50):
        raise ValueError("'payment_method' must be a short string such as 'cod' or 'mada'")
    note = doc.get("note")
    if note is not None and not isinstance(note, str):
        raise ValueError("'note' must be a string")
    change = Change(
        status=status,
        total=None if doc.get("total") is None else parse_total(doc["total"]),
        customer_id=_positive_int(doc, "customer_id"),
        reference_id=_positive_int(doc, "reference_id"),
        payment_method=payment,
        note=note,
        created_s=None if doc.get("date") is None else parse_local_time(doc["date"]),
    )
    return _positive_int(doc, "order_id"), change


def create(
    order_id: int, reference_id: int, change: Change, now_s: float, history_id: int
) -> Order:
    """A new order in `change.status` (default `under_review`), with its first history entry."""
    created_s = change.created_s if change.created_s is not None else now_s
    slug = change.status or DEFAULT_STATUS
    order = Order(
        id=order_id,
        reference_id=change.reference_id or reference_id,
        status=slug,
        total=change.total if change.total is not None else DEFAULT_TOTAL,
        customer_id=change.customer_id or DEMO_CUSTOMER,
        payment_method=change.payment_method or "cod",
        source="store",
        created_s=created_s,
        updated_s=created_s,
        histories=[HistoryEntry(history_id, slug, change.note or "", created_s)],
    )
    if slug == "completed":
        order.first_complete_s = created_s
    return order


def apply(
    order: Order, change: Change, now_s: float, next_history_id: Callable[[], int]
) -> tuple[bool, HistoryEntry | None]:
    """Apply `change`; `(changed_fields, history_entry)`: a new status adds a history entry
    (and sets `first_complete_s` the first time it is `completed`); the same status again is
    no change."""
    changed = False
    for name in ("total", "customer_id", "reference_id", "payment_method"):
        value = getattr(change, name)
        if value is not None and value != getattr(order, name):
            setattr(order, name, value)
            changed = True
    entry = None
    if change.status is not None and change.status != order.status:
        entry = HistoryEntry(next_history_id(), change.status, change.note or "", now_s)
        order.histories.append(entry)
        order.status = change.status
        if change.status == "completed" and order.first_complete_s is None:
            order.first_complete_s = now_s
    if changed or entry is not None:
        order.updated_s = now_s
    return changed, entry


def date_doc(epoch_s: float) -> dict[str, Any]:
    moment = dt.datetime.fromtimestamp(int(epoch_s), RIYADH)
    return {
        "date": moment.strftime("%Y-%m-%d %H:%M:%S.000000"),
        "timezone_type": 3,
        "timezone": "Asia/Riyadh",
    }


def local_date(epoch_s: float) -> dt.date:
    return dt.datetime.fromtimestamp(epoch_s, RIYADH).date()


def money(amount: Decimal) -> dict[str, Any]:
    """Salla writes amounts as JSON numbers here: 154, or 175.47."""
    number: int | float = int(amount) if amount == amount.to_integral_value() else float(amount)
    return {"amount": number, "currency": CURRENCY}


def status_doc(slug: str) -> dict[str, Any]:
    status = STATUSES[slug]
    return {
        "id": status.id,
        "name": status.name,
        "slug": status.slug,
        "customized": {"id": status.customized_id, "name": status.name},
    }


def customer_doc(customer_id: int, *, short: bool = False, groups: bool = True) -> dict[str, Any]:
    """The sandbox's customers are made up from their id: the full form of `order.created` and
    Order Details, or the short form `order.status.updated` carries."""
    mobile = 500000000 + customer_id % 100000000
    email = f"customer{customer_id}@example.com"
    if short:
        return {
            "id": customer_id,
            "name": f"Customer {customer_id}",
            "mobile": f"+966{mobile}",
            "email": email,
            "avatar": "https://cdn.salla.sa/images/avatar_male.png",
            "country": "السعودية",
            "city": "الرياض",
        }
    doc: dict[str, Any] = {
        "id": customer_id,
        "first_name": "Customer",
        "last_name": str(customer_id),
        "mobile": mobile,
        "mobile_code": "+966",
        "email": email,
        "avatar": "https://cdn.salla.sa/images/avatar_male.png",
        "gender": "male",
        "city": "الرياض",
        "country": "السعودية",
        "country_code": "SA",
        "currency": CURRENCY,
        "location": "",
    }
    if groups:
        doc["groups"] = []
    return doc


def _items(order: Order) -> list[dict[str, Any]]:
    zero = money(Decimal(0))
    return [
        {
            "id": order.id % 1000000000 + 70000000,
            "product_id": 720881993,
            "name": "منتج تجريبي",
            "sku": "SANDBOX-1",
            "quantity": 1,
            "weight": 0.5,
            "amounts": {
                "price_without_tax": money(order.total),
                "total_discount": zero,
                "tax": {"percent": "0.00", "amount": zero},
                "total": money(order.total),
            },
        }
    ]


def render(order: Order, *, light: bool = False, short_customer: bool = False) -> dict[str, Any]:
    """The order as Order Details (`light`: no items, no customer groups) and `order.*`
    webhooks (`short_customer`: the form inside `order.status.updated`) show it."""
    zero = money(Decimal(0))
    doc: dict[str, Any] = {
        "id": order.id,
        "reference_id": order.reference_id,
        "urls": {
            "customer": f"https://salla.sa/sandbox/order/{order.id}",
            "admin": f"https://s.salla.sa/orders/order/{order.id}",
        },
        "date": date_doc(order.created_s),
        "updated_at": date_doc(order.updated_s),
        "first_complete_at": (
            None if order.first_complete_s is None else date_doc(order.first_complete_s)
        ),
        "source": order.source,
        "status": status_doc(order.status),
        "payment_method": order.payment_method,
        "currency": CURRENCY,
        "amounts": {
            "sub_total": money(order.total),
            "shipping_cost": zero,
            "cash_on_delivery": zero,
            "tax": {"percent": "0.00", "amount": zero},
            "discounts": [],
            "total": money(order.total),
        },
        "customer": customer_doc(order.customer_id, short=short_customer, groups=not light),
        "total": money(order.total),
    }
    if not light:
        doc["items"] = _items(order)
    return doc


def list_item(order: Order) -> dict[str, Any]:
    """An order as List Orders shows it: no customer (FACTS 4.1)."""
    return {
        "id": order.id,
        "reference_id": order.reference_id,
        "total": money(order.total),
        "date": date_doc(order.created_s),
        "status": status_doc(order.status),
        "payment_method": order.payment_method,
        "items": [{"name": item["name"], "quantity": item["quantity"]} for item in _items(order)],
    }


def history_item(entry: HistoryEntry) -> dict[str, Any]:
    """A histories entry: the Arabic status name only, no slug (FACTS 4.1)."""
    return {
        "id": entry.id,
        "status": STATUSES[entry.slug].name,
        "note": entry.note,
        "created_at": date_doc(entry.at_s),
    }


def status_updated_data(order: Order, entry: HistoryEntry) -> dict[str, Any]:
    """`data` of `order.status.updated`: the history entry, the order at `data.order`."""
    return {
        "id": entry.id,
        "status": STATUSES[entry.slug].name,
        "customized": None,
        "note": entry.note,
        "created_at": date_doc(entry.at_s),
        "order": render(order, short_customer=True),
    }
