"""The sandbox's stores, and their state file.

With a state file, everything a store keeps (tokens and scope, balances and points histories,
orders and their status histories, counters, the webhook log and the held webhooks) and the
sandbox-wide counters are written to one JSON file: a temporary file in the same folder, then a
rename, so a reader never sees half a file. Rate-limit buckets restart empty, and fault switches
are not kept (they are test switches).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from service.errors import SandboxStateError
from service.sandbox.buckets import Bucket
from service.sandbox.orders import Order

STATE_VERSION = 1
#: Webhook log entries kept per store (the oldest go first), so a long-lived `run` stays small.
WEBHOOK_LOG_LIMIT = 10_000
#: Salla's scopes; `orders.read` lets the service ask Salla about orders (issue 13).
DEFAULT_SCOPE = "offline_access orders.read customers.read_write"


@dataclass
class Faults:
    """Test switches for Admin API answers. `statuses` and `latency_s` apply to the loyalty
    endpoints (as before orders existed); `orders_statuses` and `orders_latency_s` to the
    orders endpoints, so one kind of call never consumes the other's faults."""

    statuses: list[int] = field(default_factory=list)
    latency_s: float = 0.0
    drop_after_apply: int = 0
    drop_before_apply: int = 0
    invalid_customers: set[int] = field(default_factory=set)
    orders_statuses: list[int] = field(default_factory=list)
    orders_latency_s: float = 0.0


class Held(msgspec.Struct):
    """A webhook kept back by the `hold` switch until `release`: its exact bytes."""

    log_id: int
    merchant: int
    body: str
    twice: bool = False


@dataclass
class Store:
    merchant: int
    access_token: str
    refresh_token: str
    access_expires_at: float
    #: The customers endpoints' bucket (500 per 10 minutes); the loyalty endpoints take from it.
    bucket: Bucket
    #: The plan's bucket (120/360/720 a minute): every Admin API call takes from it.
    plan_bucket: Bucket = field(default_factory=lambda: Bucket(120, 60.0))
    scope: str = DEFAULT_SCOPE
    faults: Faults = field(default_factory=Faults)
    balances: dict[int, int] = field(default_factory=dict)
    history: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    used_refresh_tokens: set[str] = field(default_factory=set)
    #: The store's customers, for `select_all` (those with points are always included).
    known_customers: set[int] = field(default_factory=set)
    orders: dict[int, Order] = field(default_factory=dict)
    next_reference_id: int = 40001
    #: Every webhook the sandbox made for this store, oldest first, with its fate.
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)
    #: While on, every delivery attempt to the service fails as if it were unreachable.
    outage: bool = False
    #: Also send `order.cancelled` (the order at `data`) when an order becomes `canceled`.
    order_cancelled_event: bool = False

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def has_scope(self, wanted: str) -> bool:
        """`orders.read` is granted by `orders.read` or `orders.read_write`."""
        granted = self.scope.split()
        resource = wanted.rsplit(".", 1)[0]
        return wanted in granted or f"{resource}.read_write" in granted

    def log_webhook(self, entry: dict[str, Any]) -> None:
        self.webhooks.append(entry)
        if len(self.webhooks) > WEBHOOK_LOG_LIMIT:
            del self.webhooks[: len(self.webhooks) - WEBHOOK_LOG_LIMIT]


class _StoreDoc(msgspec.Struct):
    merchant: int
    access_token: str
    refresh_token: str
    access_expires_at: float
    scope: str
    rate_limit: int
    rate_window_s: float
    plan_rate_limit: int
    plan_rate_window_s: float
    balances: dict[int, int]
    history: dict[int, list[dict[str, Any]]]
    calls: list[dict[str, Any]]
    counters: dict[str, int]
    used_refresh_tokens: list[str]
    known_customers: list[int]
    orders: list[Order]
    next_reference_id: int
    webhooks: list[dict[str, Any]]
    held: list[Held]
    outage: bool
    order_cancelled_event: bool


class _StateDoc(msgspec.Struct):
    version: int
    entry_seq: int
    history_seq: int
    order_seq: int
    webhook_seq: int
    outage: bool
    stores: list[_StoreDoc]


@dataclass
class Counters:
    """Sandbox-wide sequences: points-history entries, status-history entries, orders,
    webhooks. Each only rises, across restarts too."""

    entry_seq: int = 1000
    history_seq: int = 198290000
    order_seq: int = 300000000
    webhook_seq: int = 0
    #: A sandbox-wide outage (every store), beside each store's own switch.
    outage: bool = False


def _to_doc(store: Store) -> _StoreDoc:
    # duplicates: _from_doc mirrors this field by field (a record and its inverse).
    return _StoreDoc(
        merchant=store.merchant,
        access_token=store.access_token,
        refresh_token=store.refresh_token,
        access_expires_at=store.access_expires_at,
        scope=store.scope,
        rate_limit=store.bucket.limit,
        rate_window_s=store.bucket.window_s,
        plan_rate_limit=store.plan_bucket.limit,
        plan_rate_window_s=store.plan_bucket.window_s,
        balances=store.balances,
        history=store.history,
        calls=store.calls,
        counters=store.counters,
        used_refresh_tokens=sorted(store.used_refresh_tokens),
        known_customers=sorted(store.known_customers),
        orders=list(store.orders.values()),
        next_reference_id=store.next_reference_id,
        webhooks=store.webhooks,
        held=store.held,
        outage=store.outage,
        order_cancelled_event=store.order_cancelled_event,
    )


def _from_doc(doc: _StoreDoc) -> Store:
    # duplicates: mirrors _to_doc field by field (a record and its inverse).
    return Store(
        merchant=doc.merchant,
        access_token=doc.access_token,
        refresh_token=doc.refresh_token,
        access_expires_at=doc.access_expires_at,
        bucket=Bucket(doc.rate_limit, doc.rate_window_s),
        plan_bucket=Bucket(doc.plan_rate_limit, doc.plan_rate_window_s),
        scope=doc.scope,
        balances=doc.balances,
        history=doc.history,
        calls=doc.calls,
        counters=doc.counters,
        used_refresh_tokens=set(doc.used_refresh_tokens),
        known_customers=set(doc.known_customers),
        orders={order.id: order for order in doc.orders},
        next_reference_id=doc.next_reference_id,
        webhooks=doc.webhooks,
        held=doc.held,
        outage=doc.outage,
        order_cancelled_event=doc.order_cancelled_event,
    )


def dump(stores: dict[int, Store], counters: Counters) -> bytes:
    doc = _StateDoc(
        version=STATE_VERSION,
        entry_seq=counters.entry_seq,
        history_seq=counters.history_seq,
        order_seq=counters.order_seq,
        webhook_seq=counters.webhook_seq,
        outage=counters.outage,
        stores=[_to_doc(store) for store in stores.values()],
    )
    return msgspec.json.encode(doc)


def write(path: Path, content: bytes) -> None:
    """Replace `path` with `content` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(path: Path) -> tuple[dict[int, Store], Counters]:
    """The stores and counters saved in `path`; nothing when it does not exist yet."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return {}, Counters()
    except OSError as exc:
        raise SandboxStateError(f"cannot read the sandbox state file {path}: {exc}") from None
    try:
        doc = msgspec.json.decode(content, type=_StateDoc)
    except msgspec.DecodeError as exc:  # ValidationError too
        raise SandboxStateError(
            f"{path} is not a sandbox state file ({exc}); move it away to start empty"
        ) from None
    if doc.version != STATE_VERSION:
        raise SandboxStateError(
            f"{path} has state version {doc.version}; this sandbox reads {STATE_VERSION}"
        )
    counters = Counters(doc.entry_seq, doc.history_seq, doc.order_seq, doc.webhook_seq, doc.outage)
    return {store.merchant: _from_doc(store) for store in doc.stores}, counters
