"""process_event: one persisted webhook → ledger changes (and token upkeep).

Called by the inbox reader for webhooks the rules use (service/inbox.py) and by the arq job
of an app lifecycle event. Handlers are registered by event name; every other event goes
through the rules.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import keys, ledger, metrics, process_state, queue, tokens
from service.events import KNOWN_ORDER_STATUSES, normalise, order_doc
from service.ids import parse_digits
from service.logging import get_logger
from service.orders import verdicts
from service.rules import RuleSet, evaluate
from service.rules.engine import Outcome, prepare
from service.rules.reloader import RulesHolder
from service.salla import TokenSet
from service.settings import Settings
from service.webhooks import Envelope, event_time, parse_envelope

log = get_logger("service.processing")

SEEN_PREFIX = queue.SEEN_PREFIX
#: Webhooks for the rules: the inbox, kept `WEBHOOK_RETENTION_DAYS` for replay (app events are
#: not in it: they carry the store's tokens).
WEBHOOK_STREAM = queue.WEBHOOK_STREAM


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


AppHandler = Callable[[ProcessingDeps, Envelope], Awaitable[dict[str, Any]]]


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
        _settings_key(env.merchant),
        json.dumps(settings if isinstance(settings, dict) else {}, ensure_ascii=False),
    )
    return {"outcome": "settings_stored"}


APP_HANDLERS: dict[str, AppHandler] = {
    "app.store.authorize": _authorize,
    "app.installed": _installed,
    "app.updated": _installed,
    "app.uninstalled": _uninstalled,
    "app.settings.updated": _settings,
}


#: Lifecycle events whose order matters: an older one must not undo a newer one.
ORDERED_APP_EVENTS = frozenset({"app.store.authorize", "app.uninstalled"})


def handles(rules: RuleSet, event: str) -> bool:
    """Whether an event is worth a job: an app event we keep, or one the rules use."""
    return event in APP_HANDLERS or rules.uses(event)


async def process_event(
    deps: ProcessingDeps,
    body: bytes,
    delivery: str,
    trace_id: str,
    *,
    kept_at_ingest: bool = False,
    app_settings: dict[str, Any] | None = None,
    arrival: tuple[int, int] | None = None,
    envelope: Envelope | None = None,
) -> dict[str, Any]:
    """Apply one webhook. Safe to run twice: the ledger only ever adds differences.

    `kept_at_ingest`: the webhook came from the inbox, where the web process already marked it
    seen and kept it for replay. Otherwise (an app event's arq job) this marks it seen here.
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
        handler = APP_HANDLERS.get(env.event)
        stale = (
            handler is not None
            and env.event in ORDERED_APP_EVENTS
            and not await tokens.lifecycle_is_current(
                deps.redis, env.merchant, event_time(env.created_at)
            )
        )
        if stale:
            result: dict[str, Any] = {"outcome": "stale", "why": "a newer lifecycle event applied"}
        elif handler is not None:
            result = await handler(deps, env)
        else:
            result = await _apply_rules(
                deps, env, delivery, trace_id, arrival=arrival, app_settings=app_settings
            )
        if not kept_at_ingest:
            async with deps.redis.pipeline(transaction=False) as pipe:
                pipe.set(SEEN_PREFIX + delivery, "1", ex=deps.settings.dedupe_ttl_s)
                if handler is None:  # a job queued by an earlier version, before the inbox
                    _keep(pipe, deps.settings, env, body, delivery, trace_id)
                await pipe.execute()
        metrics.EVENTS.labels(result.get("outcome", "unknown")).inc()
        log.info(
            "event_processed",
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            **result,
        )
        return result
    finally:
        structlog.contextvars.unbind_contextvars("merchant", "salla_event", "trace_id")


def _keep(
    pipe: Any, settings: Settings, env: Envelope, body: bytes, delivery: str, trace_id: str
) -> None:
    """Add the webhook to the replay stream (in the caller's pipeline)."""
    days = settings.webhook_retention_days
    if days <= 0:
        return
    oldest_ms = int((time.time() - days * 86400) * 1000)
    pipe.xadd(
        WEBHOOK_STREAM,
        {
            "merchant": env.merchant,
            "event": env.event,
            "delivery": delivery,
            "trace_id": trace_id,
            "body": body,
        },
        minid=str(oldest_ms),
        approximate=False,  # exact: each add removes the few entries that just expired
    )


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
    if env.event in APP_HANDLERS:
        return Replayed("skipped", [])
    diffs: list[ledger.Diff] = []
    result = await _apply_rules(
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


def _settings_key(merchant: int) -> str:
    return keys.settings(merchant)


def _settings_value(raw: str | bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def store_settings(redis: Redis, merchant: int) -> dict[str, Any]:
    """The store's app settings as last sent by `app.settings.updated` (merchant input)."""
    return _settings_value(await redis.get(_settings_key(merchant)))


async def store_settings_many(redis: Redis, merchants: set[int]) -> dict[int, dict[str, Any]]:
    """`store_settings` of several stores in one round trip (a batch of webhooks)."""
    order = sorted(merchants)
    if not order:
        return {}
    raws = await redis.mget([_settings_key(m) for m in order])
    return {m: _settings_value(raw) for m, raw in zip(order, raws, strict=True)}


async def _apply_rules(
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
        app_settings = await store_settings(deps.redis, env.merchant)
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
    if applied.ask_salla and not dry_run:
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
