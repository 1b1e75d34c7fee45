"""The flush job: claim a store's due grants, batch them, send them, record the outcome.

Every step is written to the ledger before the action it allows (`sending` before the HTTP
call), so a worker killed anywhere leaves work that the sweeper can recover without paying
twice: `claimed` goes back to pending; `sending` goes to `unknown`, never to a blind resend.
Unknown outcomes are settled by `reconcile`, which reads Salla's points history for the marker
of the call.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import ledger, metrics, queue, tokens
from service.delivery.batching import Batch, plan_batches
from service.delivery.ratelimit import RateLimiter
from service.errors import (
    OutcomeUnknown,
    SallaAuthError,
    SallaError,
    SallaRateLimited,
    SallaUnavailable,
    SallaValidationError,
)
from service.ledger import Grant
from service.logging import get_logger
from service.salla import (
    RESET_FLAG,
    SallaClient,
    TokenSet,
    history_has_marker,
    loyalty_body,
    marked_reason,
)
from service.settings import Settings

log = get_logger("service.delivery")

#: The longest a bisection waits inline for the rate limiter before putting the rest aside.
BISECT_MAX_WAIT_S = 10.0


@dataclass
class Deps:
    """What delivery needs, built once in the worker's startup."""

    settings: Settings
    redis: Redis
    pool: ArqRedis
    salla: SallaClient
    #: The customers endpoints' cap (loyalty calls take from it and from `plan`).
    bucket: RateLimiter = field(init=False)
    #: The store's plan limit, which every Admin API call counts against.
    plan: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.bucket = RateLimiter(
            self.redis, self.settings.rate_limit_requests, self.settings.rate_limit_window_s
        )
        self.plan = plan_bucket(self.redis, self.settings)

    async def take_loyalty(self, merchant: int) -> float:
        """One loyalty call: from the customers bucket and the plan bucket at once."""
        return await self.bucket.take(merchant, also=self.plan)


def plan_bucket(redis: Redis, settings: Settings) -> RateLimiter:
    """The store's plan bucket, resized by Salla's `X-RateLimit-Limit` on orders answers."""
    return RateLimiter(
        redis,
        settings.orders_rate_limit_requests,
        settings.orders_rate_limit_window_s,
        name="rl-plan",
        resize=True,
    )


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0, min(cap_s, base_s * 2 ** max(attempt - 1, 0)))


class _StopFlush(Exception):
    """Nothing more can be sent for this store now (rate limited, no token, Salla down).

    `resume_ms` is when the store's other grants become due again; None parks them too.
    """

    def __init__(self, resume_ms: int | None) -> None:
        super().__init__(resume_ms)
        self.resume_ms = resume_ms


class _Flush:
    """One run of the flush job for one store."""

    def __init__(self, deps: Deps, merchant: int, token: TokenSet, claim: str) -> None:
        self.deps = deps
        self.merchant = merchant
        self.token = token
        self.claim = claim  # this run's claim token: it only ever sends grants it holds
        self.counts = {
            "sent": 0,
            "failed": 0,
            "unknown": 0,
            "retry": 0,
            "parked": 0,
            "batches": 0,
            "rate_limit_waits": 0,
        }

    async def run(self, batches: list[Batch]) -> dict[str, int]:
        claim_ms = int(self.deps.settings.claim_timeout_s * 1000)
        for index, batch in enumerate(batches):
            # Heartbeat: the claims on what is left stay ours while this run is alive.
            await ledger.extend_claims(
                self.deps.redis,
                self.merchant,
                [g for b in batches[index:] for g in b.grants],
                claim_ms,
            )
            wait = await self.deps.take_loyalty(self.merchant)
            if wait > 0:
                rest = [g for b in batches[index:] for g in b.grants]
                due = ledger.now_ms() + int(wait * 1000)
                await ledger.release(self.deps.redis, self.merchant, rest, due)
                await queue.enqueue_flush(self.deps.pool, self.merchant, 0, delay_s=wait)
                self.counts["rate_limit_waits"] += 1
                metrics.RATE_LIMIT_WAITS.inc()
                log.info(
                    "rate_limit_wait",
                    merchant=self.merchant,
                    wait_s=round(wait, 3),
                    grants=len(rest),
                )
                return self.counts
            try:
                await self.deliver(batch, list(batch.grants))
            except _StopFlush as stop:
                rest = [g for b in batches[index + 1 :] for g in b.grants]
                if rest and stop.resume_ms is None:
                    await park_unless_authorized(
                        self.deps, self.merchant, rest, "no usable token", self.token
                    )
                elif rest and stop.resume_ms is not None:
                    await ledger.release(self.deps.redis, self.merchant, rest, stop.resume_ms)
                return self.counts  # a retry flush is already scheduled, or the store is parked
        return self.counts

    async def deliver(self, batch: Batch, grants: list[Grant]) -> None:
        """Send one call; on 422 split it in halves until the refused customers are alone."""
        refused = await self.call(batch, grants)
        if refused is None:
            return
        if len(grants) == 1:
            _count(grants, "failed")
            await ledger.finish(self.deps.redis, self.merchant, grants, "failed", refused)
            self.counts["failed"] += 1
            log.error(
                "grant_failed",
                merchant=self.merchant,
                grant_ids=[grants[0].id],
                customer_ids=[grants[0].customer],
                error=refused,
                status=422,
            )
            return
        middle = len(grants) // 2
        halves = [grants[:middle], grants[middle:]]
        log.warning("batch_bisected", merchant=self.merchant, customers=len(grants), error=refused)
        for index, half in enumerate(halves):
            await ledger.extend_claims(
                self.deps.redis,
                self.merchant,
                [g for h in halves[index:] for g in h],
                int(self.deps.settings.claim_timeout_s * 1000),
            )
            wait = await self.deps.take_loyalty(self.merchant)
            if wait > BISECT_MAX_WAIT_S:
                rest = [g for h in halves[index:] for g in h]
                due = ledger.now_ms() + int(wait * 1000)
                await ledger.release(
                    self.deps.redis, self.merchant, rest, due, refused, isolate=True
                )
                await queue.enqueue_flush(self.deps.pool, self.merchant, 0, delay_s=wait)
                return
            if wait > 0:
                await asyncio.sleep(wait)
            await self.deliver(batch, half)

    async def call(self, batch: Batch, grants: Sequence[Grant]) -> str | None:
        """POST one call for `grants`; None when settled, else Salla's refusal (422)."""
        deps, merchant = self.deps, self.merchant
        settings = deps.settings
        batch_id = uuid.uuid4().hex[:16]
        owned = await ledger.mark_sending(
            deps.redis,
            merchant,
            grants,
            batch_id,
            token=self.claim,
            call_timeout_ms=int((settings.salla_timeout_s + settings.claim_timeout_s) * 1000),
        )
        if len(owned) != len(grants):  # a stalled run lost claims: send only what it holds
            log.warning(
                "claims_lost",
                merchant=merchant,
                batch_id=batch_id,
                kept=len(owned),
                lost=len(grants) - len(owned),
            )
            if not owned:
                return None
            grants = owned
        reason = (
            marked_reason(batch.reason, batch_id) if settings.reconcile_marker else batch.reason
        )
        select_all = any(g.mode in ("select_all", "reset_all") for g in grants)
        customers = [] if select_all else [g.customer for g in grants]
        body = loyalty_body(batch.points, batch.type, reason, list(batch.channels), customers)
        if select_all:
            body["select_all"] = True
        if any(g.mode in ("reset", "reset_all") for g in grants):  # points: "unless reset"
            del body["points"]
            body[RESET_FLAG] = True
        bound = log.bind(
            merchant=merchant,
            batch_id=batch_id,
            customer_ids=len(grants),
            points=batch.points,
            type=batch.type,
            grant_ids=[g.id for g in grants],
            trace_ids=sorted({g.trace_id for g in grants if g.trace_id}),
        )
        # Ids are personal data: counts at INFO, the ids themselves only at DEBUG.
        bound.debug("batch_customers", customer_id_list=customers)
        attempt = max(g.attempts for g in grants) + 1
        started = time.perf_counter()
        refreshed = False
        while True:
            try:
                with metrics.SALLA_SECONDS.time():
                    limits = await deps.salla.add_points(self.token.access_token, body)
            except SallaAuthError as exc:
                metrics.SALLA_CALLS.labels(str(exc.status)).inc()
                if refreshed or exc.status != 401:
                    await self.park(grants, bound, f"Salla refused the token: {exc}")
                    raise _StopFlush(None) from exc
                self.token = await self.refresh(grants, bound)
                refreshed = True
                continue
            except SallaRateLimited as exc:
                metrics.SALLA_CALLS.labels("429").inc()
                await deps.bucket.observe(merchant, retry_after_s=exc.retry_after_s)
                due = await self.retry(grants, bound, attempt, str(exc), exc.retry_after_s)
                raise _StopFlush(due) from exc
            except SallaUnavailable as exc:
                metrics.SALLA_CALLS.labels(str(exc.status or "connect_error")).inc()
                due = await self.retry(grants, bound, attempt, str(exc), None)
                raise _StopFlush(due) from exc
            except OutcomeUnknown as exc:
                metrics.SALLA_CALLS.labels("no_answer").inc()
                _count(grants, "unknown")
                await ledger.finish(deps.redis, merchant, grants, "unknown", str(exc))
                await queue.enqueue_reconcile(deps.pool, merchant, settings.reconcile_after_s)
                self.counts["unknown"] += len(grants)
                bound.error(
                    "batch_outcome_unknown",
                    error=str(exc),
                    attempt=attempt,
                    duration_ms=_ms(started),
                )
                return None
            except SallaValidationError as exc:
                metrics.SALLA_CALLS.labels("422").inc()
                await ledger.unsend(deps.redis, grants)
                bound.warning(
                    "batch_refused", status=422, error=_message(exc), duration_ms=_ms(started)
                )
                return _message(exc)
            except SallaError as exc:
                metrics.SALLA_CALLS.labels(str(exc.status)).inc()
                _count(grants, "failed")
                await ledger.finish(deps.redis, merchant, grants, "failed", _message(exc))
                self.counts["failed"] += len(grants)
                bound.error(
                    "batch_failed",
                    status=exc.status,
                    error=_message(exc),
                    attempt=attempt,
                    duration_ms=_ms(started),
                )
                return None
            await deps.bucket.observe(
                merchant, remaining=limits.remaining, reset_epoch_s=limits.reset_epoch_s
            )
            await ledger.finish(deps.redis, merchant, grants, "sent")
            metrics.SALLA_CALLS.labels("201").inc()
            _count(grants, "sent")
            self.counts["sent"] += len(grants)
            self.counts["batches"] += 1
            bound.info(
                "batch_sent",
                status=201,
                attempt=attempt,
                duration_ms=_ms(started),
                rate_limit_remaining=limits.remaining,
            )
            return None

    async def refresh(self, grants: Sequence[Grant], bound: Any) -> TokenSet:
        settings = self.deps.settings
        try:
            fresh = await tokens.refresh(
                self.deps.redis,
                self.deps.salla,
                self.merchant,
                self.token.access_token,
                token_url=settings.salla_oauth_token_url,
                client_id=settings.salla_client_id,
                client_secret=settings.salla_client_secret.get_secret_value(),
            )
        except SallaError as exc:
            await self.park(grants, bound, f"token refresh failed: {exc}")
            raise _StopFlush(None) from exc
        bound.info("token_refreshed")
        return fresh

    async def park(self, grants: Sequence[Grant], bound: Any, why: str) -> None:
        await park_unless_authorized(self.deps, self.merchant, grants, why, self.token)
        self.counts["parked"] += len(grants)
        bound.warning("grants_parked", why=why)

    async def retry(
        self,
        grants: Sequence[Grant],
        bound: Any,
        attempt: int,
        why: str,
        retry_after_s: float | None,
    ) -> int:
        """Put `grants` back to pending after a backoff; return when they are due."""
        settings = self.deps.settings
        delay = (
            retry_after_s
            if retry_after_s is not None
            else backoff_s(attempt, settings.retry_base_s, settings.retry_cap_s)
        )
        due_ms = ledger.now_ms() + int(delay * 1000)
        await ledger.release(self.deps.redis, self.merchant, grants, due_ms, why)
        await queue.enqueue_flush(self.deps.pool, self.merchant, 0, delay_s=delay)
        self.counts["retry"] += len(grants)
        bound.warning("retry_scheduled", error=why, attempt=attempt, delay_s=round(delay, 3))
        return due_ms


async def park_unless_authorized(
    deps: Deps, merchant: int, grants: Sequence[Grant], why: str, used: TokenSet | None
) -> None:
    """Park grants for want of a usable token, unless the store was authorized meanwhile.

    `app.store.authorize` stores the tokens and then unparks; if it ran between our reading of
    the token and our parking, its unpark found nothing. Reading the token again after parking
    closes that window: a newer token means we unpark ourselves.
    """
    await ledger.park(deps.redis, merchant, grants, why)
    current = await tokens.get(deps.redis, merchant)
    newer = current is not None and (used is None or current.access_token != used.access_token)
    if newer and await ledger.unpark(deps.redis, merchant):
        await queue.enqueue_flush(deps.pool, merchant, 0)


async def flush(deps: Deps, merchant: int) -> dict[str, int]:
    """Send up to `batches_per_flush` batches of `merchant`'s due grants; re-enqueue if more."""
    settings = deps.settings
    claim = uuid.uuid4().hex
    claimed = await ledger.claim_due(
        deps.redis,
        merchant,
        limit=settings.batches_per_flush * settings.max_customers_per_call,
        claim_timeout_ms=int(settings.claim_timeout_s * 1000),
        token=claim,
        verify_held=settings.verify_held_grants,
    )
    for order_id in sorted(claimed.verify_orders):  # their return window ended: confirm first
        await queue.enqueue_order_truth(deps.pool, merchant, order_id)
    grants = claimed.grants
    if not grants:
        await ledger.forget_store_if_idle(deps.redis, merchant)
        return {}
    token = await tokens.get(deps.redis, merchant)
    if token is None:
        await park_unless_authorized(deps, merchant, grants, "store has no access token", None)
        log.warning("grants_parked", merchant=merchant, grants=len(grants), why="no token")
        return {"parked": len(grants)}
    batches = plan_batches(grants, settings.max_customers_per_call)
    # Fairness: a bounded number of calls per job, whatever the shape of the backlog.
    now, later = batches[: settings.batches_per_flush], batches[settings.batches_per_flush :]
    if later:
        await ledger.release(
            deps.redis, merchant, [g for b in later for g in b.grants], ledger.now_ms()
        )
    run = _Flush(deps, merchant, token, claim)
    counts = await run.run(now)
    if counts["rate_limit_waits"] or counts["retry"] or counts["parked"]:
        return counts
    if await ledger.due_count(deps.redis, merchant):
        await queue.enqueue_flush(deps.pool, merchant, 0)  # fairness: a new job, not a loop
    else:
        await ledger.forget_store_if_idle(deps.redis, merchant)
    return counts


async def reconcile(deps: Deps, merchant: int) -> dict[str, int]:
    """Settle unknown outcomes from Salla's points history; never resend on a guess.

    For each unanswered call old enough to show up in the history: the call's marker in a
    customer's history means it applied (sent); a readable history without it means it did not
    (pending again, sent anew); an unreadable history is tried again later and, after
    `reconcile_max_attempts`, the grant goes to review.
    """
    settings = deps.settings
    counts = {"sent": 0, "resend": 0, "review": 0, "later": 0}
    before = ledger.now_ms() - int(settings.reconcile_after_s * 1000)
    grants = await ledger.unknown_since(deps.redis, merchant, before)
    token = await tokens.get(deps.redis, merchant)
    for grant in grants:
        if not settings.reconcile_marker or not grant.batch:
            await ledger.resolve_unknown(
                deps.redis, merchant, [grant], "review", "no marker to read the outcome back"
            )
            counts["review"] += 1
            continue
        if token is None or await deps.take_loyalty(merchant) > 0:
            counts["later"] += 1
            continue
        try:
            history = await deps.salla.points_history(token.access_token, grant.customer)
        except (SallaError, OSError) as exc:
            attempts = await ledger.count_reconcile_attempt(deps.redis, grant)
            if attempts >= settings.reconcile_max_attempts:
                await ledger.resolve_unknown(
                    deps.redis,
                    merchant,
                    [grant],
                    "review",
                    f"history unreadable {attempts} times: {exc}",
                )
                counts["review"] += 1
                log.error(
                    "grant_to_review",
                    merchant=merchant,
                    grant_ids=[grant.id],
                    batch_id=grant.batch,
                    error=str(exc),
                )
            else:
                counts["later"] += 1
            continue
        applied = history_has_marker(history, grant.batch)
        note = "found in the points history" if applied else "not in the history; sending again"
        await ledger.resolve_unknown(
            deps.redis, merchant, [grant], "sent" if applied else "pending", f"reconciled: {note}"
        )
        counts["sent" if applied else "resend"] += 1
        (log.info if applied else log.warning)(
            "reconciled",
            merchant=merchant,
            grant_ids=[grant.id],
            batch_id=grant.batch,
            outcome="applied" if applied else "not_applied",
        )
    if counts["resend"]:
        await queue.enqueue_flush(deps.pool, merchant, 0)
    await ledger.forget_unknown_store_if_empty(deps.redis, merchant)
    return counts


async def refresh_expiring_tokens(deps: Deps) -> int:
    """Refresh tokens ahead of expiry, each under its store's lock."""
    settings = deps.settings
    refreshed = 0
    for merchant, current in await tokens.expiring(deps.redis, settings.token_refresh_ahead_s):
        try:
            await tokens.refresh(
                deps.redis,
                deps.salla,
                merchant,
                current.access_token,
                token_url=settings.salla_oauth_token_url,
                client_id=settings.salla_client_id,
                client_secret=settings.salla_client_secret.get_secret_value(),
            )
        except SallaError as exc:
            log.error("token_refresh_failed", merchant=merchant, error=str(exc))
            continue
        refreshed += 1
        log.info("token_refreshed", merchant=merchant, scheduled=True)
    return refreshed


def _count(grants: Sequence[Grant], state: str) -> None:
    for grant in grants:
        metrics.GRANTS.labels(metrics.rule_label(grant.rule), state).inc()


def _message(exc: SallaError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            fields = error.get("fields")
            return f"{error.get('message', '')} {fields or ''}".strip()
    return str(exc)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
