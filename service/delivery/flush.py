"""The flush job: claim a store's due grants, batch them, send them, record the outcome.

Every step is written to the ledger before the action it allows (`sending` before the HTTP
call), so a worker killed anywhere leaves work that the sweeper can recover without paying
twice: `claimed` goes back to pending; `sending` goes to `unknown`, never to a blind resend.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import ledger, queue, tokens
from service.delivery.batching import Batch, plan_batches
from service.errors import (
    OutcomeUnknown,
    SallaAuthError,
    SallaError,
    SallaRateLimited,
    SallaUnavailable,
    SallaValidationError,
)
from service.logging import get_logger
from service.salla import SallaClient, TokenSet, loyalty_body
from service.settings import Settings

log = get_logger("service.delivery")


@dataclass
class Deps:
    """What delivery needs, built once in the worker's startup."""

    settings: Settings
    redis: Redis
    pool: ArqRedis
    salla: SallaClient


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


async def flush(deps: Deps, merchant: int) -> dict[str, int]:
    """Send up to `batches_per_flush` batches of `merchant`'s due grants; re-enqueue if more."""
    settings = deps.settings
    counts = {"sent": 0, "failed": 0, "unknown": 0, "retry": 0, "parked": 0, "batches": 0}
    grants = await ledger.claim_due(
        deps.redis,
        merchant,
        limit=settings.batches_per_flush * settings.max_customers_per_call,
        claim_timeout_ms=int(settings.claim_timeout_s * 1000),
    )
    if not grants:
        await ledger.forget_store_if_idle(deps.redis, merchant)
        return counts
    token = await tokens.get(deps.redis, merchant)
    if token is None:
        await ledger.park(deps.redis, merchant, grants, "store has no access token")
        log.warning("grants_parked", merchant=merchant, grants=len(grants), why="no token")
        counts["parked"] = len(grants)
        return counts
    batches = plan_batches(grants, settings.max_customers_per_call)
    for index, batch in enumerate(batches):
        try:
            token = await _send(deps, merchant, batch, token, counts)
        except _StopFlush as stop:
            rest = [g for b in batches[index + 1 :] for g in b.grants]
            if rest and stop.resume_ms is None:
                await ledger.park(deps.redis, merchant, rest, "store has no usable token")
            elif rest and stop.resume_ms is not None:
                await ledger.release(deps.redis, merchant, rest, stop.resume_ms)
            return counts  # a retry flush is already scheduled, or the store is parked
    if await ledger.due_count(deps.redis, merchant):
        await queue.enqueue_flush(deps.pool, merchant, 0)
    else:
        await ledger.forget_store_if_idle(deps.redis, merchant)
    return counts


async def _send(
    deps: Deps, merchant: int, batch: Batch, token: TokenSet, counts: dict[str, int]
) -> TokenSet:
    batch_id = uuid.uuid4().hex[:16]
    body = loyalty_body(
        batch.points, batch.type, batch.reason, list(batch.channels), batch.customers
    )
    grants = batch.grants
    bound = log.bind(
        merchant=merchant,
        batch_id=batch_id,
        customers=len(grants),
        points=batch.points,
        type=batch.type,
        grant_ids=[g.id for g in grants],
        trace_ids=sorted({g.trace_id for g in grants if g.trace_id}),
    )
    await ledger.mark_sending(deps.redis, merchant, grants, batch_id)
    attempt = max(g.attempts for g in grants) + 1
    started = time.perf_counter()
    refreshed = False
    while True:
        try:
            await deps.salla.add_points(token.access_token, body)
        except SallaAuthError as exc:
            if refreshed or exc.status != 401:
                await _park(deps, merchant, grants, bound, f"Salla refused the token: {exc}")
                counts["parked"] += len(grants)
                raise _StopFlush(None) from exc
            token = await _refresh(deps, merchant, token, grants, bound, counts)
            refreshed = True
            continue
        except SallaRateLimited as exc:
            due = await _retry(
                deps, merchant, grants, bound, attempt, str(exc), exc.retry_after_s, counts
            )
            raise _StopFlush(due) from exc
        except SallaUnavailable as exc:
            due = await _retry(deps, merchant, grants, bound, attempt, str(exc), None, counts)
            raise _StopFlush(due) from exc
        except OutcomeUnknown as exc:
            await ledger.finish(deps.redis, merchant, grants, "unknown", str(exc))
            counts["unknown"] += len(grants)
            bound.error(
                "batch_outcome_unknown", error=str(exc), attempt=attempt, duration_ms=_ms(started)
            )
            return token
        except (SallaValidationError, SallaError) as exc:
            await ledger.finish(deps.redis, merchant, grants, "failed", _message(exc))
            counts["failed"] += len(grants)
            bound.error(
                "batch_failed",
                status=exc.status,
                error=_message(exc),
                attempt=attempt,
                duration_ms=_ms(started),
            )
            return token
        await ledger.finish(deps.redis, merchant, grants, "sent")
        counts["sent"] += len(grants)
        counts["batches"] += 1
        bound.info("batch_sent", status=201, attempt=attempt, duration_ms=_ms(started))
        return token


async def _refresh(
    deps: Deps, merchant: int, token: TokenSet, grants: Any, bound: Any, counts: dict[str, int]
) -> TokenSet:
    settings = deps.settings
    try:
        fresh = await tokens.refresh(
            deps.redis,
            deps.salla,
            merchant,
            token.access_token,
            token_url=settings.salla_oauth_token_url,
            client_id=settings.salla_client_id,
            client_secret=settings.salla_client_secret.get_secret_value(),
        )
    except SallaError as exc:
        await _park(deps, merchant, grants, bound, f"token refresh failed: {exc}")
        counts["parked"] += len(grants)
        raise _StopFlush(None) from exc
    bound.info("token_refreshed")
    return fresh


async def _park(deps: Deps, merchant: int, grants: Any, bound: Any, why: str) -> None:
    await ledger.park(deps.redis, merchant, grants, why)
    bound.warning("grants_parked", why=why)


async def _retry(
    deps: Deps,
    merchant: int,
    grants: Any,
    bound: Any,
    attempt: int,
    why: str,
    retry_after_s: float | None,
    counts: dict[str, int],
) -> int:
    """Put `grants` back to pending after a backoff; return when they are due."""
    settings = deps.settings
    delay = (
        retry_after_s
        if retry_after_s is not None
        else backoff_s(attempt, settings.retry_base_s, settings.retry_cap_s)
    )
    due_ms = ledger.now_ms() + int(delay * 1000)
    await ledger.release(deps.redis, merchant, grants, due_ms, why)
    await queue.enqueue_flush(deps.pool, merchant, 0, delay_s=delay)
    counts["retry"] += len(grants)
    bound.warning("retry_scheduled", error=why, attempt=attempt, delay_s=round(delay, 3))
    return due_ms


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
