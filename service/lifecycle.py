"""App lifecycle events (`app.*`): the store's tokens, its install, its app settings.

Few, and they carry the store's tokens, so they are not kept in the inbox: they travel in a
stream of their own on the state store (`sr:{inbox}:app-events`), deleted once processed, and
one store's events are applied one at a time in their event time's order (service/batch.py).
Handlers are upserts; those whose order matters (`ORDERED_APP_EVENTS`) also refuse an event
older than the last one applied. Handlers are registered by event name in `HANDLERS`; the names
are `service.events.LIFECYCLE_EVENTS` (the web reads those without importing this).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from service import keys, ledger, queue, tokens
from service.ids import parse_digits
from service.logging import get_logger
from service.salla import TokenSet
from service.webhooks import Envelope, event_time

if TYPE_CHECKING:  # processing imports this module
    from service.processing import ProcessingDeps

log = get_logger("service.processing")

AppHandler = Callable[["ProcessingDeps", Envelope], Awaitable[dict[str, Any]]]


async def _authorize(deps: ProcessingDeps, env: Envelope) -> dict[str, Any]:
    data = env.data
    access, refresh = data.get("access_token"), data.get("refresh_token")
    if not isinstance(access, str) or not access:
        return {"outcome": "ignored", "why": "app.store.authorize without access_token"}
    expires_at_s = _expiry(data.get("expires"))
    if expires_at_s is None:
        why = f"'expires' must be an epoch time before {LAST_EPOCH_S}; the tokens were not stored"
        log.error("store_authorize_refused", expires=repr(data.get("expires"))[:40], why=why)
        return {"outcome": "refused", "why": why}
    await tokens.save(
        deps.redis,
        env.merchant,
        TokenSet(
            access_token=access,
            refresh_token=refresh if isinstance(refresh, str) else "",
            expires_at_s=expires_at_s,
            scope=str(data.get("scope", "")),
        ),
    )
    await tokens.note_install_time(deps.redis, env.merchant, event_time(env.created_at))
    resumed = await ledger.unpark(deps.redis, env.merchant)
    await queue.enqueue_flush(deps.pool, env.merchant, deps.settings.batch_window_s)
    return {"outcome": "tokens_stored", "resumed_grants": resumed}


#: 9999-12-31T23:59:59Z: the last time Python's datetime (and so `admin store`) can show.
LAST_EPOCH_S = 253_402_300_799


def _expiry(value: object) -> int | None:
    """`expires` of app.store.authorize as epoch seconds: 0 when absent or not a number (the
    token is used until Salla refuses it); None when it is a number no clock can reach (1e20,
    negative), which refuses the event."""
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            return 0
        value = parse_digits(text)  # None beyond 19 digits: past any clock
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if not 0 <= value <= LAST_EPOCH_S:
        return None
    return int(value)


async def _installed(deps: ProcessingDeps, env: Envelope) -> dict[str, Any]:
    await tokens.mark_installed(deps.redis, env.merchant, env.event)
    if env.event == "app.installed":
        await tokens.note_install_time(deps.redis, env.merchant, event_time(env.created_at))
    return {"outcome": "store_recorded"}


async def _uninstalled(deps: ProcessingDeps, env: Envelope) -> dict[str, Any]:
    await tokens.revoke(deps.redis, env.merchant, "uninstalled")
    return {"outcome": "tokens_removed"}


async def _settings(deps: ProcessingDeps, env: Envelope) -> dict[str, Any]:
    settings = env.data.get("settings")
    await deps.redis.set(
        keys.settings(env.merchant),
        json.dumps(settings if isinstance(settings, dict) else {}, ensure_ascii=False),
    )
    return {"outcome": "settings_stored"}


HANDLERS: dict[str, AppHandler] = {
    "app.store.authorize": _authorize,
    "app.installed": _installed,
    "app.updated": _installed,
    "app.uninstalled": _uninstalled,
    "app.settings.updated": _settings,
}


#: Lifecycle events whose order matters: an older one must not undo a newer one.
ORDERED_APP_EVENTS = frozenset({"app.store.authorize", "app.uninstalled"})


def _settings_value(raw: str | bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def store_settings(redis: Redis, merchant: int) -> dict[str, Any]:
    """The store's app settings as last sent by `app.settings.updated` (merchant input)."""
    return _settings_value(await redis.get(keys.settings(merchant)))


async def store_settings_many(redis: Redis, merchants: set[int]) -> dict[int, dict[str, Any]]:
    """`store_settings` of several stores in one round trip (a batch of webhooks). A pipeline
    of GETs, not an MGET: each store's settings are in its own slot, and reads need nothing
    atomic between them."""
    order = sorted(merchants)
    if not order:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for merchant in order:
            pipe.get(keys.settings(merchant))
        raws: list[str | None] = await pipe.execute()
    return {m: _settings_value(raw) for m, raw in zip(order, raws, strict=True)}
