"""The flush job: claim a store's due grants, batch them, send them, record the outcome.

Every step is written to the ledger before the action it allows (`sending` before the HTTP
call), so a worker killed anywhere leaves work that the sweeper can recover without paying
twice: `claimed` goes back to pending; `sending` goes to `unknown`, never to a blind resend.
Unknown outcomes are settled by `delivery.reconcile`, which reads Salla's points history for
the marker of the call; a 422 is handled by `delivery.refused` (bisection), scheduled token
refreshes by `delivery.refresh`.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

from service import keys, ledger, metrics, queue, tokens
from service.delivery import refused
from service.delivery.batching import Batch, plan_batches
from service.delivery.deps import Deps
from service.errors import (
    OutcomeUnknown,
    SallaAuthError,
    SallaError,
    SallaRateLimited,
    SallaUnavailable,
    SallaValidationError,
    ServiceError,
)
from service.ledger import Grant
from service.logging import get_logger
from service.salla import (
    RESET_FLAG,
    TokenSet,
    loyalty_body,
    marked_reason,
)
from service.state_store import NotReplicated

log = get_logger("service.delivery")


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter, capped."""
    return random.uniform(0, min(cap_s, base_s * 2 ** max(attempt - 1, 0)))


class StopFlush(ServiceError):
    """Nothing more can be sent for this store now (rate limited, no token, Salla down).

    `resume_ms` is when the store's other grants become due again; None parks them too.
    """

    def __init__(self, resume_ms: int | None) -> None:
        super().__init__(resume_ms)
        self.resume_ms = resume_ms


class FlushRun:
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
        for index, batch in enumerate(batches):
            rest = [g for b in batches[index:] for g in b.grants]
            wait = await self.next_turn(rest)
            if wait > 0:
                await self.defer(rest, wait)
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
                await refused.deliver(self, batch, list(batch.grants))
            except StopFlush as stop:
                rest = [g for b in batches[index + 1 :] for g in b.grants]
                if rest and stop.resume_ms is None:
                    await park_unless_authorized(
                        self.deps, self.merchant, rest, "no usable token", self.token
                    )
                elif rest and stop.resume_ms is not None:
                    await ledger.release(self.deps.redis, self.merchant, rest, stop.resume_ms)
                return self.counts  # a retry flush is already scheduled, or the store is parked
        return self.counts

    async def next_turn(self, remaining: Sequence[Grant]) -> float:
        """Before each call: keep the claims on what is left ours (a heartbeat while this run
        is alive) and take one call from the store's buckets; how long to wait first."""
        claim_ms = int(self.deps.settings.claim_timeout_s * 1000)
        await ledger.extend_claims(self.deps.redis, self.merchant, remaining, claim_ms)
        return await self.deps.take_loyalty(self.merchant)

    async def defer(
        self, grants: Sequence[Grant], wait_s: float, why: str = "", *, isolate: bool = False
    ) -> int:
        """Give `grants` back to pending, due in `wait_s`, and schedule the flush that will
        send them; return when they are due."""
        due_ms = ledger.now_ms() + int(wait_s * 1000)
        await ledger.release(self.deps.redis, self.merchant, grants, due_ms, why, isolate=isolate)
        await queue.enqueue_flush(self.deps.pool, self.merchant, 0, delay_s=wait_s)
        return due_ms

    async def call(self, batch: Batch, grants: Sequence[Grant]) -> str | None:
        """POST one call for `grants`; None when settled, else Salla's refusal (422)."""
        batch_id = uuid.uuid4().hex[:16]
        owned = await self.own(grants, batch_id)
        if not owned:
            return None
        body = self.body(batch, owned, batch_id)
        bound = log.bind(
            merchant=self.merchant,
            batch_id=batch_id,
            customer_ids=len(owned),
            points=batch.points,
            type=batch.type,
            grant_ids=[g.id for g in owned],
            trace_ids=sorted({g.trace_id for g in owned if g.trace_id}),
        )
        # Ids are personal data: counts at INFO, the ids themselves only at DEBUG.
        bound.debug("batch_customers", customer_id_list=body["customers"])
        return await self.send(body, owned, bound)

    async def own(self, grants: Sequence[Grant], batch_id: str) -> Sequence[Grant]:
        """Mark `grants` as being sent in `batch_id` (before the call: a worker killed during
        it leaves them `sending`, never resent blindly); the ones this run still holds."""
        settings = self.deps.settings
        owned = await ledger.mark_sending(
            self.deps.redis,
            self.merchant,
            grants,
            batch_id,
            token=self.claim,
            call_timeout_ms=int((settings.salla_timeout_s + settings.claim_timeout_s) * 1000),
        )
        # On a cluster: no call before a replica has `sending` (a failover that lost it would
        # let another worker send these grants again).
        try:
            await self.deps.replicated(keys.replica_mark(self.merchant))
        except NotReplicated as exc:
            await self.not_sent(owned, batch_id, exc)
        if len(owned) != len(grants):  # a stalled run lost claims: send only what it holds
            log.warning(
                "claims_lost",
                merchant=self.merchant,
                batch_id=batch_id,
                kept=len(owned),
                lost=len(grants) - len(owned),
            )
            return owned
        return grants

    async def not_sent(self, grants: Sequence[Grant], batch_id: str, exc: NotReplicated) -> None:
        """No replica confirmed `sending` (the slot's master has none, or it lags, or the
        master changed): no call is made. The grants go back to pending after a pause, if
        this master still says they are `sending` in this batch; else the flush ends like a
        lost Redis and the sweep recovers them as a lost worker's."""
        pause = random.uniform(1, 2) * self.deps.settings.replica_wait_timeout_s
        due_ms = ledger.now_ms() + int(pause * 1000)
        why = "no replica confirmed the transition"
        if not await ledger.release_unsent(
            self.deps.redis, self.merchant, grants, batch_id, due_ms, why
        ):
            raise exc
        await queue.enqueue_flush(self.deps.pool, self.merchant, 0, delay_s=pause)
        self.counts["retry"] += len(grants)
        log.warning(
            "grants_wait_for_replica",
            merchant=self.merchant,
            grants=len(grants),
            error=str(exc),
            delay_s=round(pause, 3),
        )
        raise StopFlush(due_ms) from exc

    def body(self, batch: Batch, grants: Sequence[Grant], batch_id: str) -> dict[str, Any]:
        """The loyalty call's body: the batch's points, reason (marked with the batch id when
        outcomes are reconciled), channels and customers, or a store-wide / reset call."""
        reason = batch.reason
        if self.deps.settings.reconcile_marker:
            reason = marked_reason(batch.reason, batch_id)
        select_all = any(g.mode in ("select_all", "reset_all") for g in grants)
        customers = [] if select_all else [g.customer for g in grants]
        body = loyalty_body(batch.points, batch.type, reason, list(batch.channels), customers)
        if select_all:
            body["select_all"] = True
        if any(g.mode in ("reset", "reset_all") for g in grants):  # points: "unless reset"
            del body["points"]
            body[RESET_FLAG] = True
        return body

    async def send(self, body: dict[str, Any], grants: Sequence[Grant], bound: Any) -> str | None:
        """The call itself, once more after a refreshed token; each outcome recorded by its
        own step. None when settled, else Salla's refusal (422)."""
        attempt = max(g.attempts for g in grants) + 1
        started = time.perf_counter()
        refreshed = False
        while True:
            try:
                with metrics.SALLA_SECONDS.time():
                    limits = await self.deps.salla.add_points(self.token.access_token, body)
            except SallaAuthError as exc:
                metrics.SALLA_CALLS.labels(str(exc.status)).inc()
                if refreshed or exc.status != 401:
                    await self.park(grants, bound, f"Salla refused the token: {exc}")
                    raise StopFlush(None) from exc
                self.token = await self.refresh(grants, bound)
                refreshed = True
                continue
            except SallaRateLimited as exc:
                metrics.SALLA_CALLS.labels("429").inc()
                await self.deps.bucket.observe(self.merchant, retry_after_s=exc.retry_after_s)
                due = await self.retry(grants, bound, attempt, str(exc), exc.retry_after_s)
                raise StopFlush(due) from exc
            except SallaUnavailable as exc:
                metrics.SALLA_CALLS.labels(str(exc.status or "connect_error")).inc()
                due = await self.retry(grants, bound, attempt, str(exc), None)
                raise StopFlush(due) from exc
            except OutcomeUnknown as exc:
                await self.unknown(grants, bound, exc, attempt, started)
                return None
            except SallaValidationError as exc:
                metrics.SALLA_CALLS.labels("422").inc()
                await ledger.unsend(self.deps.redis, grants)
                bound.warning(
                    "batch_refused", status=422, error=_message(exc), duration_ms=_ms(started)
                )
                return _message(exc)
            except SallaError as exc:
                metrics.SALLA_CALLS.labels(str(exc.status)).inc()
                await self.fail(grants, _message(exc))
                bound.error(
                    "batch_failed",
                    status=exc.status,
                    error=_message(exc),
                    attempt=attempt,
                    duration_ms=_ms(started),
                )
                return None
            await self.sent(grants, bound, limits, attempt, started)
            return None

    async def sent(
        self, grants: Sequence[Grant], bound: Any, limits: Any, attempt: int, started: float
    ) -> None:
        await self.deps.bucket.observe(
            self.merchant, remaining=limits.remaining, reset_epoch_s=limits.reset_epoch_s
        )
        await ledger.finish(self.deps.redis, self.merchant, grants, "sent")
        await self.deps.replicated(keys.replica_mark(self.merchant))  # before the next call
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

    async def unknown(
        self,
        grants: Sequence[Grant],
        bound: Any,
        exc: OutcomeUnknown,
        attempt: int,
        started: float,
    ) -> None:
        """No answer: the call may have applied. Never resent; `reconcile` reads it back."""
        metrics.SALLA_CALLS.labels("no_answer").inc()
        _count(grants, "unknown")
        await ledger.finish(self.deps.redis, self.merchant, grants, "unknown", str(exc))
        await queue.enqueue_reconcile(
            self.deps.pool, self.merchant, self.deps.settings.reconcile_after_s
        )
        self.counts["unknown"] += len(grants)
        bound.error(
            "batch_outcome_unknown", error=str(exc), attempt=attempt, duration_ms=_ms(started)
        )

    async def fail(self, grants: Sequence[Grant], why: str) -> None:
        """Settle `grants` as failed (an operator can retry them: `grants retry`)."""
        _count(grants, "failed")
        await ledger.finish(self.deps.redis, self.merchant, grants, "failed", why)
        self.counts["failed"] += len(grants)

    async def refresh(self, grants: Sequence[Grant], bound: Any) -> TokenSet:
        try:
            fresh = await self.deps.refresh_token(self.merchant, self.token.access_token)
        except SallaError as exc:
            await self.park(grants, bound, f"token refresh failed: {exc}")
            raise StopFlush(None) from exc
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
        due_ms = await self.defer(grants, delay, why)
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
    run = FlushRun(deps, merchant, token, claim)
    counts = await run.run(now)
    if counts["rate_limit_waits"] or counts["retry"] or counts["parked"]:
        return counts
    if await ledger.due_count(deps.redis, merchant):
        await queue.enqueue_flush(deps.pool, merchant, 0)  # fairness: a new job, not a loop
    else:
        await ledger.forget_store_if_idle(deps.redis, merchant)
    return counts


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
