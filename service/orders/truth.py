"""Ask Salla what an order is: `GET /orders/{id}` decides what its webhooks could not.

The `order_truth` job runs for one order at a time (job id `order_truth:<store>:<order>`):

* when two events of the order tie on every part of their key but arrival and disagree;
* when the order is first seen completed in an event older than one already judged;
* when held points (`hold_days`) are due: the order is confirmed before they may be sent.

The fetched state is judged by every rule about orders and decides each rule it matches or
revokes; it commits only if the order's ledger entry did not change while Salla was asked
(else it asks again). An order Salla no longer has (404) deserves nothing. The job never sleeps
in a worker: the store's plan bucket defers it (arq's `Retry`), as does a Salla outage.

Orders are asked only when the store's token carries `orders.read`; otherwise arrival order
stands, held points are released unconfirmed, and `order_truth_unavailable` is logged once per
store with the reason (`admin store` shows it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from arq.worker import Retry
from redis.asyncio import Redis

from service import ledger, queue, tokens
from service.delivery.deps import Deps as DeliveryDeps
from service.delivery.flush import backoff_s
from service.errors import (
    SallaAuthError,
    SallaError,
    SallaNotFound,
    SallaRateLimited,
    SallaUnavailable,
)
from service.events import EventContext, parse_customer, parse_order, salla_date_ms
from service.lifecycle import store_settings
from service.logging import get_logger
from service.orders import verdicts
from service.processing import ProcessingDeps
from service.rules.engine import prepare
from service.salla import RateLimitInfo, TokenSet

log = get_logger("service.orders")

#: Scopes that let an app read orders (`orders.read_write` includes reading).
READ_SCOPES = frozenset({"orders.read", "orders.read_write"})
#: A fetched state that keeps losing the race with new events is asked again this many times
#: in one run, then the job defers itself.
MAX_REFETCH = 3
UNAVAILABLE_FIELD = tokens.ORDER_TRUTH_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Deps:
    """What the orders jobs need: the rules (processing) and the Admin API (delivery)."""

    processing: ProcessingDeps
    delivery: DeliveryDeps

    @property
    def redis(self) -> Redis:
        return self.delivery.redis


@dataclass(frozen=True, slots=True)
class Fetched:
    """Salla's answer about one order: its object (None when Salla no longer has it)."""

    order: dict[str, Any] | None
    asked_ms: int


def can_read_orders(token: TokenSet) -> bool:
    return bool(READ_SCOPES & set(token.scope.replace(",", " ").split()))


async def settle_order(
    deps: Deps, merchant: int, order_id: int, *, job_try: int = 1
) -> dict[str, Any]:
    """The `order_truth` job: fetch the order, apply its state, release its confirmed holds.
    However it ends (but by `Retry`), the order's record of being asked about goes
    (`ledger.asked`)."""
    result = await _settle(deps, merchant, order_id, job_try=job_try)
    await ledger.forget_asked(deps.redis, merchant, order_id)
    return result


async def _settle(deps: Deps, merchant: int, order_id: int, *, job_try: int) -> dict[str, Any]:
    redis = deps.redis
    token = await orders_token(deps, merchant)
    if token is None:
        released = await ledger.release_verified(redis, merchant, order_id)
        await flush_if(deps, merchant, released)
        return {"outcome": "unavailable", "released_unconfirmed": released}
    applied: ledger.Applied | None = None
    for _ in range(MAX_REFETCH):
        read = await ledger.read_order(redis, merchant, order_id)
        fetched = await fetch(deps, merchant, order_id, token, job_try=job_try)
        if fetched is None:  # the token was refused and could not be renewed
            released = await ledger.release_verified(redis, merchant, order_id)
            await flush_if(deps, merchant, released)
            return {"outcome": "unavailable", "released_unconfirmed": released}
        applied = await apply_fetched(deps, merchant, order_id, fetched, expect=read.version)
        if not applied.conflict:
            break
    if applied is None or applied.conflict:
        raise Retry(defer=1.0)  # events keep arriving: ask again shortly
    released = await ledger.release_verified(redis, merchant, order_id)
    await flush_if(deps, merchant, len(applied.grants) + released)
    result = {
        "outcome": "applied" if applied.changed else "confirmed",
        "order_id": order_id,
        "grants": len(applied.grants),
        "released": released,
    }
    log.info("order_truth", merchant=merchant, **result)
    return result


async def fetch(
    deps: Deps, merchant: int, order_id: int, token: TokenSet, *, job_try: int = 1
) -> Fetched | None:
    """`GET /orders/{id}` within the store's plan bucket. Raises arq's `Retry` to wait for the
    bucket or a Salla outage; returns None when the token is refused even after one refresh."""
    delivery = deps.delivery
    wait = await delivery.plan.take(merchant)
    if wait > 0:
        raise Retry(defer=wait)
    refreshed = False
    while True:
        asked_ms = ledger.now_ms()
        try:
            order, limits = await delivery.salla.order(token.access_token, order_id)
        except SallaNotFound as exc:
            if _from_salla(exc.body):
                return Fetched(None, asked_ms)
            # Not Salla's error envelope: a wrong SALLA_API_BASE or a proxy, not a gone order.
            await mark_unavailable(
                deps.redis, merchant, "the orders endpoint answered 404 without Salla's envelope"
            )
            return None
        except SallaRateLimited as exc:
            await delivery.plan.observe(merchant, retry_after_s=exc.retry_after_s)
            raise Retry(defer=exc.retry_after_s) from exc
        except SallaUnavailable as exc:
            settings = delivery.settings
            raise Retry(
                defer=backoff_s(job_try, settings.retry_base_s, settings.retry_cap_s)
            ) from exc
        except SallaAuthError as exc:
            renewed = None if refreshed else await _refresh(deps, merchant, token)
            if renewed is None:
                await mark_unavailable(
                    deps.redis, merchant, f"Salla refused the orders call ({exc.status})"
                )
                return None
            token, refreshed = renewed, True
            continue
        await observe_limits(delivery, merchant, limits)
        return Fetched(order, asked_ms)


def _from_salla(body: object) -> bool:
    """Salla's error envelope (`{"status": 404, "success": false, "error": {...}}`)."""
    return isinstance(body, dict) and body.get("success") is False and "error" in body


# duplicates: a keyword call shaped like ledger/apply.py's Grant construction (shape only).
async def observe_limits(delivery: DeliveryDeps, merchant: int, limits: RateLimitInfo) -> None:
    await delivery.plan.observe(
        merchant,
        remaining=limits.remaining,
        reset_epoch_s=limits.reset_epoch_s,
        limit=limits.limit,
    )


async def apply_fetched(
    deps: Deps,
    merchant: int,
    order_id: int,
    fetched: Fetched,
    *,
    expect: str | None,
    dry_run: bool = False,
    diffs: list[ledger.Diff] | None = None,
) -> ledger.Applied:
    """Judge a fetched state by every rule about orders and apply it (if the order's entry is
    still at `expect`). Rules see the state's own time (`updated_at`) as `now`."""
    processing = deps.processing
    ruleset = processing.rules.for_merchant(merchant)
    raw = fetched.order or {}
    updated_ms = salla_date_ms(raw.get("updated_at")) or fetched.asked_ms
    moment = dt.datetime.fromtimestamp(updated_ms / 1000, dt.UTC)
    order = parse_order(raw) if raw else parse_order({"id": order_id})
    base = EventContext(
        event=verdicts.FETCHED_EVENT,
        merchant=merchant,
        now=moment,
        order=order,
        customer=parse_customer(raw.get("customer")),
    )
    ctx, _problems = prepare(ruleset, base, await store_settings(deps.redis, merchant))
    key = verdicts.fetched_key(fetched.asked_ms, gone=fetched.order is None)
    judge = verdicts.judge_order(
        ruleset,
        ctx,
        key,
        delivery=f"fetched:{order_id}:{fetched.asked_ms}",
        since_ms=verdicts.completion_ms(raw, updated_ms),
        gone=fetched.order is None,
        rules_for="order.*",
    )
    return await ledger.apply_event(
        deps.redis,
        merchant,
        order_id,
        judge,
        trace_id=f"order_truth:{order_id}",
        skew_s=processing.settings.order_clock_skew_s,
        expect_version=expect,
        dry_run=dry_run,
        diffs=diffs,
    )


async def orders_token(deps: Deps, merchant: int) -> TokenSet | None:
    """The store's token if it may read orders; else None, said once per store."""
    token = await tokens.get(deps.redis, merchant)
    if token is None:
        await mark_unavailable(deps.redis, merchant, "the store has no access token")
        return None
    if not can_read_orders(token):
        await mark_unavailable(
            deps.redis,
            merchant,
            "the store's token lacks the orders.read scope (the app must request it and the "
            "merchant approve it)",
        )
        return None
    return token


async def _refresh(deps: Deps, merchant: int, used: TokenSet) -> TokenSet | None:
    """Renew the token once after a 401 (at most once per token: a refresh another worker
    already made is reused). Grants are never parked for an orders call."""
    try:
        return await deps.delivery.refresh_token(merchant, used.access_token)
    except SallaError:
        return None


async def mark_unavailable(redis: Redis, merchant: int, why: str) -> None:
    """Record why Salla cannot be asked about this store's orders; log it the first time.
    A store the service never heard of gets no record (an operator's typo stays a typo)."""
    key = tokens.store_key(merchant)
    if not await redis.exists(key):
        return
    before = await redis.hget(key, UNAVAILABLE_FIELD)  # type: ignore[misc]
    if before == why:
        return
    await redis.hset(key, mapping={UNAVAILABLE_FIELD: why})  # type: ignore[misc]
    log.warning(
        "order_truth_unavailable",
        merchant=merchant,
        why=why,
        consequence="webhooks decide in arrival order; held points are released unconfirmed",
    )


async def flush_if(deps: Deps, merchant: int, count: int) -> None:
    if count:
        await queue.enqueue_flush(deps.delivery.pool, merchant, 0)
