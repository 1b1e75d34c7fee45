"""process_event: one persisted webhook → ledger changes.

Called for the entries of both inbox streams (service/batch.py): the rules' webhooks and the app
lifecycle events. App events go to their handler (service/lifecycle.py); every other event goes
through the rules into the ledger (`apply_rules`).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import structlog
from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import ledger, lifecycle, metrics, process_state, queue, tokens
from service.events import KNOWN_ORDER_STATUSES, LIFECYCLE_EVENTS, normalise, order_doc
from service.logging import get_logger
from service.orders import verdicts
from service.rules import RuleSet, evaluate
from service.rules.engine import Outcome, prepare
from service.rules.reloader import RulesHolder
from service.settings import Settings
from service.webhooks import Envelope, event_time, parse_envelope

log = get_logger("service.processing")


@dataclass
class ProcessingDeps:
    settings: Settings
    redis: Redis
    pool: ArqRedis
    rules_source: RuleSet | RulesHolder

    @property
    def rules(self) -> RuleSet:
        source = self.rules_source
        return source.current if isinstance(source, RulesHolder) else source


async def process_event(
    deps: ProcessingDeps,
    body: bytes,
    delivery: str,
    trace_id: str,
    *,
    app_settings: dict[str, Any] | None = None,
    arrival: tuple[int, int] | None = None,
    envelope: Envelope | None = None,
) -> dict[str, Any]:
    """Apply one webhook. Safe to run twice: the ledger only ever adds differences.

    The web process marked the delivery seen when it wrote it to its stream.
    `app_settings`: the store's app settings, when the caller read them for a whole batch.
    `arrival`: the inbox entry id; `envelope`: `body` already parsed by the caller.
    One `event_processed` line tells what happened: each rule's verdict and each grant queued.
    """
    started = time.perf_counter()
    env = envelope or parse_envelope(body)
    structlog.contextvars.bind_contextvars(
        merchant=env.merchant, salla_event=env.event, trace_id=trace_id
    )
    try:
        handler = lifecycle.HANDLERS.get(env.event)
        stale = (
            handler is not None
            and env.event in lifecycle.ORDERED_APP_EVENTS
            and not await tokens.lifecycle_is_current(
                deps.redis, env.merchant, event_time(env.created_at)
            )
        )
        if stale:
            result: dict[str, Any] = {"outcome": "stale", "why": "a newer lifecycle event applied"}
        elif handler is not None:
            result = await handler(deps, env)
        else:
            result = await apply_rules(
                deps, env, delivery, trace_id, arrival=arrival, app_settings=app_settings
            )
        metrics.EVENTS.labels(result.get("outcome", "unknown")).inc()
        log.info(
            "event_processed",
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            **result,
        )
        return result
    finally:
        structlog.contextvars.unbind_contextvars("merchant", "salla_event", "trace_id")


@dataclass
class Replayed:
    """One stored webhook run again through the current rules."""

    outcome: str
    diffs: list[ledger.Diff]


async def replay_event(
    deps: ProcessingDeps,
    body: bytes,
    delivery: str,
    *,
    received_at: dt.datetime,
    dry_run: bool,
    stream_id: str = "",
) -> Replayed:
    """Run a stored webhook through today's rules; the ledger turns it into differences only.

    Rules see the webhook's own time (or when it was first received), so campaign windows stay
    as they were. A dry run writes nothing. The event keeps its place among its order's events
    (its inbox entry id), so replaying a range, in any order, leaves each order where its
    newest decisive events put it.
    """
    env = parse_envelope(body)
    if env.event in LIFECYCLE_EVENTS:
        return Replayed("skipped", [])
    diffs: list[ledger.Diff] = []
    result = await apply_rules(
        deps,
        env,
        delivery,
        "replay",
        arrival=verdicts.arrival_of(stream_id) if stream_id else None,
        now=received_at,
        dry_run=dry_run,
        diffs=diffs,
    )
    return Replayed(str(result.get("outcome", "no_change")), diffs)


async def apply_rules(
    deps: ProcessingDeps,
    env: Envelope,
    delivery: str,
    trace_id: str,
    *,
    arrival: tuple[int, int] | None = None,
    now: dt.datetime | None = None,
    dry_run: bool = False,
    diffs: list[ledger.Diff] | None = None,
    app_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rules' verdicts → the ledger. The result carries each rule's verdict (`rules`) and
    each grant queued (`queued`) for the event's one log line.

    `arrival`: the inbox entry id (where the event stands among same-second events of its
    order); `now`: when it was received, for an event whose stamp cannot be read.
    """
    ruleset = deps.rules.for_merchant(env.merchant)
    if app_settings is None:
        app_settings = await lifecycle.store_settings(deps.redis, env.merchant)
    received = now or dt.datetime.now(dt.UTC)
    moment = verdicts.event_moment(env, received) if env.event.startswith("order.") else received
    ctx, problems = prepare(ruleset, normalise(env, moment), app_settings)
    for problem in problems:
        log.warning("store_setting_ignored", problem=problem)
    order_id = ctx.order.id if env.event.startswith("order.") else 0
    if order_id and ctx.order.status and ctx.order.status not in KNOWN_ORDER_STATUSES:
        log.warning("unknown_order_status", order_id=order_id, status=ctx.order.status)
    if not order_id:
        outcomes = evaluate(ruleset, ctx, delivery)
        grants = await ledger.apply_outcomes(
            deps.redis,
            env.merchant,
            outcomes,
            customer=ctx.customer.id,
            trace_id=trace_id,
            dry_run=dry_run,
            diffs=diffs,
        )
        return await _result(deps, env, outcomes, grants, dry_run=dry_run, order_id=0, ctx=ctx)
    key = verdicts.event_key(env, arrival or _local_arrival(received))
    seen: list[Outcome] = []
    judge = verdicts.judge_order(
        ruleset,
        ctx,
        key,
        delivery=delivery,
        since_ms=verdicts.completion_ms(order_doc(env), int(moment.timestamp() * 1000)),
        gone=env.event == "order.deleted",
        seen=seen,
    )
    applied = await ledger.apply_event(
        deps.redis,
        env.merchant,
        order_id,
        judge,
        trace_id=trace_id,
        skew_s=deps.settings.order_clock_skew_s,
        dry_run=dry_run,
        diffs=diffs,
    )
    if applied.retired:
        # Its entry is gone (LEDGER_RETENTION_DAYS after it settled): a completion sent again
        # would pay a second time, so nothing this event says is applied.
        log.warning(
            "order_retired",
            order_id=order_id,
            retention_days=deps.settings.ledger_retention_days,
            consequence="event refused: the order was retired, nothing granted or taken back",
        )
        return {"outcome": "order_retired", "order_id": order_id, "grants": 0}
    if applied.ask_salla and not dry_run:
        await ledger.note_asked(deps.redis, env.merchant, order_id)  # remade if the queue loses it
        await queue.enqueue_order_truth(deps.pool, env.merchant, order_id)
    result = await _result(
        deps, env, seen, applied.grants, dry_run=dry_run, order_id=order_id, ctx=ctx
    )
    if applied.ask_salla:
        result["asked_salla"] = True
    return result


def _local_arrival(received: dt.datetime) -> tuple[int, int]:
    """An arrival for an event that did not come through the inbox (tools, tests): when it was
    received, then the order this process saw them in."""
    return int(received.timestamp() * 1000), next(process_state.arrivals)


async def _result(
    deps: ProcessingDeps,
    env: Envelope,
    outcomes: list[Outcome],
    grants: list[ledger.Grant],
    *,
    dry_run: bool,
    order_id: int,
    ctx: Any,
) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "order_id": order_id or None,
        "customer_id": ctx.customer.id or None,
        "rules": [
            {
                "rule_id": o.rule_id,
                "verdict": o.verdict,
                "deserved": o.deserved,
                "scope": o.scope,
                "why": o.why,
            }
            for o in outcomes
        ],
    }
    if dry_run:
        return {"outcome": "would_queue" if grants else "no_change", "grants": len(grants)}
    for grant in grants:
        metrics.GRANTS.labels(metrics.rule_label(grant.rule), "queued").inc()
    if grants:
        await queue.enqueue_flush(deps.pool, env.merchant, deps.settings.batch_window_s)
    return {
        "outcome": "grants_queued" if grants else "no_change",
        "grants": len(grants),
        **facts,
        "queued": [
            {
                "grant_id": g.id,
                "rule_id": g.rule,
                "points": g.points,
                "type": g.type,
                "scope": g.scope,
                "due_in_s": max(0, round((g.due_ms - g.created_ms) / 1000)),
            }
            for g in grants
        ],
    }
