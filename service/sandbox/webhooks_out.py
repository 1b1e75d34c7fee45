"""Webhooks the sandbox sends to the service, as a Salla store does, and their switches.

Each webhook is built once (envelope `{event, merchant, created_at, data}`, signed with
`X-Salla-Signature` by `service.webhooks.signed_headers`) and logged in its store's webhook log
with its fate, which the switches decide:

    drop       never sent                                 fate "dropped"
    hold       kept until `release` (as_is/reverse/shuffle) fate "held", then as sent
    delay_s    sent that much later, on a task             fate "delayed", then as sent
    twice      sent twice, identical bytes, one after the other
    (none)     sent now; the caller waits for the answer   fate "sent" (200/201) or "failed"

Without a webhook URL nothing is sent ("not_sent"). An outage (per store or sandbox-wide)
makes every delivery attempt fail as if the service were unreachable: a webhook whose attempts
all met the outage ends "dropped" (reason "outage"). Failed attempts are re-sent `resends`
times, `resend_delay_s` apart (Salla: 3 times about 5 minutes apart; the sandbox's default is
none, so tests see one attempt). Work still waiting at shutdown ends "lost_at_shutdown".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import msgspec
import orjson

from service.sandbox.orders import RIYADH
from service.sandbox.state import Held, Store
from service.webhooks import signed_headers

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: Fates after which nothing more happens to a webhook.
FINAL = frozenset({"sent", "failed", "dropped", "not_sent", "lost_at_shutdown"})
ReleaseOrder = Literal["as_is", "reverse", "shuffle"]


class Switches(msgspec.Struct, forbid_unknown_fields=True):
    """Per-request webhook switches (`"webhook": {...}` of `POST /_sandbox/orders`)."""

    drop: bool = False
    delay_s: float = 0.0
    twice: bool = False
    hold: bool = False
    #: An envelope `created_at` to use instead of the current time.
    created_at: str | None = None
    #: Reuse the `created_at` of the previous webhook of the same order.
    same_second: bool = False
    #: Also send `order.cancelled` when the order becomes canceled (default: the store's option).
    order_cancelled: bool | None = None


def parse_switches(doc: object) -> Switches:
    try:
        switches = msgspec.convert(doc or {}, Switches)
    except msgspec.ValidationError as exc:
        raise ValueError(f"'webhook': {exc}") from None
    if not 0 <= switches.delay_s <= 3600:
        raise ValueError("'webhook': delay_s must be between 0 and 3600 seconds")
    return switches


def envelope_time(epoch_s: float) -> str:
    """`created_at` as store events carry it: "Sun Jun 26 2022 12:21:48 GMT+0300" (Riyadh)."""
    moment = dt.datetime.fromtimestamp(int(epoch_s), RIYADH)
    return (
        f"{_DAYS[moment.weekday()]} {_MONTHS[moment.month - 1]} {moment.day:02d} {moment.year} "
        f"{moment:%H:%M:%S} GMT{moment:%z}"
    )


@dataclass
class Outgoing:
    """One webhook made and logged, not yet through its switches."""

    store: Store
    entry: dict[str, Any]
    body: bytes


def build(
    store: Store, log_id: int, event: str, order_id: int, created_at: str, data: dict[str, Any]
) -> Outgoing:
    envelope = {"event": event, "merchant": store.merchant, "created_at": created_at, "data": data}
    entry: dict[str, Any] = {
        "id": log_id,
        "event": event,
        "merchant": store.merchant,
        "order_id": order_id,
        "created_at": created_at,
        "fate": "new",
        "deliveries": [],
    }
    if event == "order.status.updated":
        entry["history_id"] = data["id"]
    store.log_webhook(entry)
    store.count("webhooks")
    return Outgoing(store, entry, orjson.dumps(envelope))


class Outbox:
    """Sends webhooks from the sandbox server's event loop; owns the HTTP client and tasks."""

    def __init__(
        self,
        url: str | None,
        secret: str,
        *,
        resends: int,
        resend_delay_s: float,
        timeout_s: float,
        sandbox_outage: Callable[[], bool],
        changed: Callable[[], None],
    ) -> None:
        self.url = url
        self.secret = secret
        self.resends = resends
        self.resend_delay_s = resend_delay_s
        self.timeout_s = timeout_s
        self._sandbox_outage = sandbox_outage
        self._changed = changed
        self._client: httpx.AsyncClient | None = None
        #: Delayed sends and re-sends in flight: kept so none is garbage-collected mid-way.
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Salla waits about 30 s for an answer; the same here by default.
        self._client = httpx.AsyncClient(timeout=self.timeout_s)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _fate(self, entry: dict[str, Any], fate: str, reason: str | None = None) -> None:
        entry["fate"] = fate
        if reason:
            entry["reason"] = reason
        self._changed()

    def route(self, item: Outgoing, switches: Switches) -> bool:
        """Apply the switches that need no I/O; True when the webhook is to be sent (now or
        later), which needs the server's event loop."""
        entry, store = item.entry, item.store
        shown = {
            name: value
            for name in ("drop", "delay_s", "twice", "hold", "same_second")
            if (value := getattr(switches, name))
        }
        if shown:
            entry["switches"] = shown
        if switches.drop:
            store.count("webhooks_dropped")
            self._fate(entry, "dropped", "drop switch")
        elif self.url is None:
            self._fate(entry, "not_sent", "the sandbox has no webhook URL")
        elif switches.hold:
            store.held.append(
                Held(entry["id"], store.merchant, item.body.decode("utf-8"), switches.twice)
            )
            store.count("webhooks_held")
            self._fate(entry, "held")
        else:
            return True
        return False

    async def send(self, items: list[tuple[Outgoing, Switches]]) -> None:
        """Send now, one after the other in this order (awaiting each answer), or schedule the
        delayed ones."""
        for item, switches in items:
            if switches.delay_s > 0:
                self._fate(item.entry, "delayed")
                self._spawn(self._later(switches.delay_s, item, switches.twice))
            else:
                await self._deliver(item, switches.twice)

    async def release(
        self, held: list[tuple[Store, Held]], order: ReleaseOrder, seed: int | None
    ) -> list[dict[str, Any]]:
        """Send `held` webhooks in `order` (by log id, reversed, or shuffled with `seed`), one
        after the other."""
        held = sorted(held, key=lambda pair: pair[1].log_id)
        if order == "reverse":
            held.reverse()
        elif order == "shuffle":
            random.Random(seed).shuffle(held)
        released = []
        for store, item in held:
            entry = find_entry(store, item.log_id)
            entry["released"] = True
            outgoing = Outgoing(store, entry, item.body.encode("utf-8"))
            if self.url is None:
                self._fate(entry, "not_sent", "the sandbox has no webhook URL")
            else:
                await self._deliver(outgoing, item.twice)
            released.append(entry)
        return released

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, delay_s: float, item: Outgoing, twice: bool) -> None:
        try:
            await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            self._fate(item.entry, "lost_at_shutdown")
            raise
        await self._deliver(item, twice)

    async def _deliver(self, item: Outgoing, twice: bool, attempt: int = 0) -> None:
        delivered = False
        outage_only = True
        for _ in range(2 if twice else 1):
            ok, outage = await self._attempt(item)
            delivered = delivered or ok
            outage_only = outage_only and outage
        store, entry = item.store, item.entry
        if delivered:
            store.count("webhooks_sent")
            self._fate(entry, "sent")
        elif attempt < self.resends:
            self._fate(entry, "retrying")
            self._spawn(self._resend(item, twice, attempt + 1))
        elif outage_only:
            store.count("webhooks_dropped")
            self._fate(entry, "dropped", "outage")
        else:
            store.count("webhooks_failed")
            self._fate(entry, "failed")

    async def _resend(self, item: Outgoing, twice: bool, attempt: int) -> None:
        try:
            await asyncio.sleep(self.resend_delay_s)
        except asyncio.CancelledError:
            self._fate(item.entry, "lost_at_shutdown")
            raise
        await self._deliver(item, twice, attempt)

    async def _attempt(self, item: Outgoing) -> tuple[bool, bool]:
        """One POST: `(delivered, met_the_outage)`. Only 200 and 201 count, as at Salla."""
        record: dict[str, Any] = {"at": round(time.time(), 3)}
        item.entry["deliveries"].append(record)
        if item.store.outage or self._sandbox_outage():
            record["error"] = "outage"
            return False, True
        if self._client is None or self.url is None:
            record["error"] = "the sandbox is not serving"
            return False, False
        headers = signed_headers(item.body, self.secret)
        try:
            answer = await self._client.post(self.url, content=item.body, headers=headers)
        except httpx.HTTPError as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"[:200]
            return False, False
        record["status"] = answer.status_code
        record["answer"] = answer.text[:200]
        return answer.status_code in (200, 201), False


def find_entry(store: Store, log_id: int) -> dict[str, Any]:
    """The log entry `log_id` of `store` (a stand-in if the log no longer holds it)."""
    logged: dict[str, Any]
    for logged in reversed(store.webhooks):
        if logged["id"] == log_id:
            return logged
    entry: dict[str, Any] = {
        "id": log_id,
        "merchant": store.merchant,
        "fate": "new",
        "deliveries": [],
    }
    store.log_webhook(entry)
    return entry
