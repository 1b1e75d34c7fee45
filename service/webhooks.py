"""Salla webhook verification and envelope parsing. No I/O.

Both security strategies Salla offers are supported:

* `Signature`: `X-Salla-Signature` is the lower-case hex HMAC-SHA256 of the raw body, keyed
  with the app's webhook secret.
* `Token`: `Authorization` carries the webhook secret itself (optionally as `Bearer <secret>`).

`sign()` sits next to `verify()` so tests and the `send` command build requests exactly as
Salla does.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import orjson

from service.errors import InvalidPayload, InvalidSignature
from service.ids import WHAT_AN_ID_IS, parse_id

Strategy = Literal["signature", "token"]

#: Store events Salla documents (FACTS.md section 2): what rules may listen to.
STORE_EVENTS = frozenset(
    {
        "order.created",
        "order.updated",
        "order.status.updated",
        "order.cancelled",
        "order.refunded",
        "order.deleted",
        "order.products.updated",
        "order.payment.updated",
        "order.coupon.updated",
        "order.total.price.updated",
        "order.shipment.creating",
        "order.shipment.created",
        "order.shipment.cancelled",
        "order.shipment.return.creating",
        "order.shipment.return.created",
        "order.shipment.return.cancelled",
        "order.shipping.address.updated",
        "customer.created",
        "customer.updated",
        "customer.login",
        "customer.otp.request",
        "review.added",
        "invoice.created",
    }
)
#: App events Salla sends every app without a subscription (FACTS.md section 2).
# duplicates: events.LIFECYCLE_EVENTS is the subset the service keeps (a different set).
APP_EVENTS = frozenset(
    {
        "app.store.authorize",
        "app.installed",
        "app.updated",
        "app.uninstalled",
        "app.settings.updated",
        "app.trial.started",
        "app.trial.expired",
        "app.trial.canceled",
        "app.subscription.started",
        "app.subscription.expired",
        "app.subscription.canceled",
        "app.subscription.renewed",
        "app.feedback.created",
    }
)

STRATEGY_HEADER = "x-salla-security-strategy"
SIGNATURE_HEADER = "x-salla-signature"
AUTHORIZATION_HEADER = "authorization"


def sign(body: bytes, secret: str) -> str:
    """The `X-Salla-Signature` value Salla sends for `body`."""
    mac = _keyed(secret).copy()  # the keyed state, copied: cheaper than keying every time
    mac.update(body)
    return mac.hexdigest()


@functools.lru_cache(maxsize=8)
def _keyed(secret: str) -> hmac.HMAC:
    """HMAC-SHA256 keyed with `secret`, before any message. OpenSSL 3 fetches the digest and
    keys a new context on every one-shot `hmac.digest` (6.4 µs for an order); a copy of this
    costs 4.5."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def signed_headers(body: bytes, secret: str, strategy: Strategy = "signature") -> dict[str, str]:
    """Headers that make `body` a webhook delivery exactly as Salla sends it."""
    headers = {"Content-Type": "application/json"}
    if strategy == "signature":
        headers["X-Salla-Security-Strategy"] = "Signature"
        headers["X-Salla-Signature"] = sign(body, secret)
    else:
        headers["X-Salla-Security-Strategy"] = "Token"
        headers["Authorization"] = secret
    return headers


def verify(headers: Mapping[str, str], body: bytes, secret: str, strategy: Strategy) -> None:
    """Raise `InvalidSignature` unless the request proves it comes from Salla.

    `headers` must be case-insensitive (Starlette's are); values are compared case-insensitively
    where Salla may vary their case, and secrets are compared in constant time.
    """
    if not secret:
        raise InvalidSignature("webhook secret is not configured")
    announced = headers.get(STRATEGY_HEADER, "").strip().lower()
    if announced and announced != strategy:
        raise InvalidSignature(
            f"security strategy {announced!r} does not match the configured {strategy!r}"
        )
    if strategy == "signature":
        given = headers.get(SIGNATURE_HEADER, "").strip().lower()
        if not given:
            raise InvalidSignature("missing X-Salla-Signature header")
        if not hmac.compare_digest(given.encode(), sign(body, secret).encode()):
            raise InvalidSignature("signature does not match the request body")
    else:
        given = headers.get(AUTHORIZATION_HEADER, "").strip()
        if given[:7].lower() == "bearer ":
            given = given[7:].strip()
        if not given:
            raise InvalidSignature("missing Authorization header")
        if not hmac.compare_digest(given.encode(), secret.encode()):
            raise InvalidSignature("webhook token does not match")


@dataclass(frozen=True, slots=True)
class Envelope:
    """The parts of a Salla webhook body every event shares."""

    event: str
    merchant: int
    created_at: str
    data: Mapping[str, Any]
    raw: Mapping[str, Any]


def parse_envelope(body: bytes) -> Envelope:
    """Parse a verified body into an `Envelope`, or raise `InvalidPayload` saying why."""
    try:
        # orjson: strict RFC 8259 (UTF-8 only, no NaN), 5-10x faster than json on these bodies,
        # and nesting past 1,024 levels is a decode error rather than a RecursionError.
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayload(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidPayload("body is not a JSON object")
    missing = [key for key in ("event", "merchant", "data") if key not in doc]
    if missing:
        raise InvalidPayload(f"not a Salla webhook envelope: missing {', '.join(missing)}")
    event = doc["event"]
    if not isinstance(event, str) or not event or len(event) > 100:
        raise InvalidPayload("'event' must be a non-empty string")
    merchant = parse_id(doc["merchant"])
    if merchant is None:
        raise InvalidPayload(f"'merchant' must be a store id: {WHAT_AN_ID_IS}")
    data = doc["data"]
    if not isinstance(data, dict):
        raise InvalidPayload("'data' must be a JSON object")
    created_at = doc.get("created_at")
    return Envelope(
        event=event,
        merchant=merchant,
        created_at=created_at if isinstance(created_at, str) else "",
        data=data,
        raw=doc,
    )


class _Head(msgspec.Struct):
    """What the edge reads of a body: the envelope. `data` is checked as JSON, not built."""

    event: str
    merchant: int | str
    data: msgspec.Raw


_HEAD = msgspec.json.Decoder(_Head)


@dataclass(frozen=True, slots=True)
class Head:
    """The envelope fields the web process needs to deduplicate, persist and log a delivery."""

    event: str
    merchant: int


def read_head(body: bytes) -> Head:
    """Check a verified body is a Salla envelope, reading only the envelope; or raise
    `InvalidPayload` saying why.

    The web process answers before anything uses `data`, so building it as Python objects (as
    `parse_envelope` does for the worker) is wasted there: for an order it was most of the
    request's CPU. msgspec checks the whole body is JSON and skips over `data` without
    building it. A body this refuses goes through `parse_envelope`, so a refusal says exactly
    what the full parse says. The bodies accepted are those `parse_envelope` accepts, with one
    exception a signed body can carry: a number too large for a double inside `data` (1e400).
    That passes here, and the worker rejects it (`event_rejected`)."""
    try:
        # Strict UTF-8 first, as orjson checks it (msgspec does not check text it skips). The
        # decoded text is thrown away: msgspec reads bytes; given a str it would encode it back
        # to UTF-8 first (14 µs for an order instead of 6).
        body.decode("utf-8")
        head = _HEAD.decode(body)
    except (UnicodeDecodeError, RecursionError, msgspec.DecodeError):  # ValidationError too
        head = None
    if head is not None and head.event and len(head.event) <= 100:
        merchant = parse_id(head.merchant)
        if merchant is not None and memoryview(head.data)[:1].tobytes() == b"{":
            return Head(event=head.event, merchant=merchant)
    env = parse_envelope(body)  # raises, saying why
    return Head(event=env.event, merchant=env.merchant)


def delivery_id(merchant: int, event: str, body: bytes) -> str:
    """A stable id for one delivery: Salla sends none, and re-sends the same bytes."""
    digest = hashlib.sha256(body).hexdigest()[:32]
    return f"{merchant}:{event}:{digest}"


_JS_DATE = "%a %b %d %Y %H:%M:%S GMT%z"  # "Sun Jun 26 2022 12:21:48 GMT+0300"


_MONTHS = {
    m: n
    for n, m in enumerate(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1
    )
}
_DAYS = frozenset(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])


def _js_date(text: str) -> float | None:
    """`_JS_DATE` read by hand (strptime costs ~20 µs, on every order event); None for any
    other shape, which then goes through strptime."""
    parts = text.split(" ")
    if len(parts) != 6 or parts[0] not in _DAYS or len(parts[5]) != 8:
        return None
    month, offset = _MONTHS.get(parts[1]), parts[5]
    clock = parts[4].split(":")
    if month is None or not offset.startswith(("GMT+", "GMT-")) or len(clock) != 3:
        return None
    try:
        minutes = int(offset[4:6]) * 60 + int(offset[6:8])
        zone = dt.timezone(dt.timedelta(minutes=minutes if offset[3] == "+" else -minutes))
        moment = dt.datetime(
            int(parts[3]), month, int(parts[2]), int(clock[0]), int(clock[1]), int(clock[2]),
            tzinfo=zone,
        )  # fmt: skip
    except ValueError:
        return None
    return moment.timestamp()


@functools.lru_cache(maxsize=4096)
def event_time(created_at: str) -> float | None:
    """Epoch seconds of an envelope's `created_at`, or None when it cannot be read.

    Cached: events of one busy second share their stamp, and each order event reads it twice
    (its key and the rules' `now`); a bounded cache, since stamps come from the outside.

    Salla uses several formats: "Sun Jun 26 2022 12:21:48 GMT+0300" (store events),
    "2022-12-31 12:31:25" (app events, read as UTC) and ISO 8601. The time only orders events
    of one store; it never keys idempotency.
    """
    text = created_at.strip()
    if not text:
        return None
    fast = _js_date(text)
    if fast is not None:
        return fast
    try:
        moment = dt.datetime.strptime(text, _JS_DATE)
    except ValueError:
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()
