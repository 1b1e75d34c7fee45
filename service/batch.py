"""What a worker does with a batch of inbox entries (the rules' events, or the app lifecycle
events of their own stream), in lanes.

Events of one order are applied one after another, in their key's order (which spares the
ledger needless back-and-forth); different orders run concurrently. The stores' app settings
are read once for the whole batch. The inbox reader (service/inbox.py) hands each batch here
and acknowledges what this says is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import lifecycle, metrics, state_store
from service.errors import InvalidPayload
from service.events import LIFECYCLE_EVENTS, order_doc
from service.ids import parse_id
from service.inbox import Entry
from service.logging import get_logger
from service.orders import verdicts
from service.processing import ProcessingDeps, process_event
from service.webhooks import Envelope, parse_envelope

log = get_logger("service.inbox")

_REDIS_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, *state_store.FAILING_OVER)

Item = tuple[Entry, Envelope | None]


class BatchHandler:
    """The inbox's handler: `await handler(entries)` → the stream ids that are done."""

    def __init__(self, deps: ProcessingDeps) -> None:
        self.deps = deps

    async def __call__(self, entries: Sequence[Entry]) -> list[bytes]:
        settings = await lifecycle.store_settings_many(
            self.deps.redis, {e.merchant for e in entries}
        )
        lanes: dict[object, list[Item]] = {}
        for entry in entries:
            env = _envelope(entry.body)
            lanes.setdefault(_lane(entry, env), []).append((entry, env))
        outcomes = await asyncio.gather(*(self._lane(items, settings) for items in lanes.values()))
        return [stream_id for lane in outcomes for stream_id in lane]

    async def _lane(self, items: list[Item], settings: dict[int, dict[str, Any]]) -> list[bytes]:
        if len(items) > 1:
            items.sort(key=_order_position)
        done = []
        for entry, env in items:
            if await self._one(entry, settings.get(entry.merchant, {}), env):
                done.append(entry.stream_id)
        return done

    async def _one(self, entry: Entry, app_settings: dict[str, Any], env: Envelope | None) -> bool:
        try:
            await process_event(
                self.deps,
                entry.body,
                entry.delivery,
                entry.trace_id,
                app_settings=app_settings,
                arrival=verdicts.arrival_of(entry.stream_id),
                envelope=env,
            )
        except InvalidPayload as exc:
            # Accepted at the edge, which reads only the envelope (`read_head`), but not a body
            # the rules can read: trying again cannot help. It stays in the replay log.
            log.error(
                "event_rejected",
                trace_id=entry.trace_id,
                delivery=entry.delivery,
                error=exc.message,
            )
            metrics.EVENTS.labels("rejected").inc()
            return True
        except _REDIS_TRANSIENT as exc:
            log.warning(
                "event_retry_later",
                trace_id=entry.trace_id,
                delivery=entry.delivery,
                error=repr(exc),
            )
            return False
        except Exception:
            log.exception("event_failed", trace_id=entry.trace_id, delivery=entry.delivery)
            metrics.EVENTS.labels("failed").inc()
            return False
        return True


def _envelope(body: bytes) -> Envelope | None:
    """The entry's envelope, or None for a body the worker must reject (processing says why)."""
    try:
        return parse_envelope(body)
    except InvalidPayload:
        return None


def _lane(entry: Entry, env: Envelope | None) -> object:
    """Entries of one order share a lane, and so do one store's app lifecycle events (they are
    applied in their event time's order); every other entry has one of its own."""
    if env is not None and env.event in LIFECYCLE_EVENTS:
        return ("app", env.merchant)
    if env is not None:
        order_id = parse_id(order_doc(env).get("id"))
        if order_id:
            return (env.merchant, order_id)
    return entry.stream_id


def _order_position(item: Item) -> tuple[int, int, int, tuple[int, int]]:
    entry, env = item
    arrival = verdicts.arrival_of(entry.stream_id)
    if env is None:
        return (1, 0, 0, arrival)
    key = verdicts.event_key(env, arrival)
    return (key.rank, key.at_s or 0, key.seq or 0, arrival)
