"""An order's event, or its state fetched from Salla, → the ledger's input. Pure.

The rules are evaluated knowing what the ledger remembers of the order (`OrderFacts`: whether
any event showed it completed), so `judge_order` returns a function of those facts; the ledger
calls it again if the facts change before its commit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from service.events import EventContext, salla_date_ms
from service.ids import parse_id
from service.ledger import verdict_of
from service.ledger.event_key import RANK_CREATED, RANK_EVENT, RANK_GONE, EventKey
from service.ledger.facts import OrderFacts, Snapshot
from service.ledger.order_state import EventVerdicts, ScopedVerdict
from service.rules import RuleSet, evaluate
from service.rules.engine import Outcome, revokes
from service.webhooks import Envelope, event_time

#: What rules see as `event` when they judge a state fetched from Salla's orders API.
FETCHED_EVENT = "order.updated"

Judge = Callable[[OrderFacts], EventVerdicts]


def arrival_of(stream_id: str | bytes) -> tuple[int, int]:
    """An inbox entry id ("1700000000000-3") as the key's arrival part."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


def event_key(env: Envelope, arrival: tuple[int, int]) -> EventKey:
    """Where a webhook stands among its order's events (see service/order_state.py)."""
    rank = {"order.created": RANK_CREATED, "order.deleted": RANK_GONE}.get(env.event, RANK_EVENT)
    at = event_time(env.created_at)
    seq = parse_id(env.data.get("id")) if env.event == "order.status.updated" else None
    return EventKey(rank, None if at is None else int(at), seq, arrival)


def fetched_key(asked_ms: int, *, gone: bool = False) -> EventKey:
    """A state fetched from Salla: newer than every webhook that arrived before it was asked."""
    return EventKey(RANK_GONE if gone else RANK_EVENT, asked_ms // 1000, None, (asked_ms, 0), True)


def completion_ms(raw_order: Mapping[str, Any], fallback_ms: int) -> int:
    """When the order was completed (the hold of held points counts from then): Salla's
    `first_complete_at`, else `fallback_ms` (the event's own time)."""
    return salla_date_ms(raw_order.get("first_complete_at")) or fallback_ms


def judge_order(
    ruleset: RuleSet,
    ctx: EventContext,
    key: EventKey,
    *,
    delivery: str,
    since_ms: int,
    gone: bool = False,
    rules_for: str | None = None,
    seen: list[Outcome] | None = None,
) -> Judge:
    """The ledger's input for one order event, as a function of what the ledger knows.

    `rules_for`: evaluate the rules of this event name instead of `ctx.event`'s (a fetched
    state is judged by every rule about orders). `gone`: Salla no longer has the order; it
    deserves nothing. `seen` receives the outcomes of the last evaluation (for the log line).
    """

    def judge(facts: OrderFacts) -> EventVerdicts:
        order, local = ctx.order, ctx
        if facts.completed and not order.completed_once:
            order = dataclasses.replace(order, completed_once=True)
            local = dataclasses.replace(ctx, order=order)
        revoked = revokes(ruleset, local)
        outcomes = [] if gone else _outcomes(ruleset, local, delivery, rules_for, revoked)
        if seen is not None:
            seen[:] = outcomes
        verdicts = [
            ScopedVerdict(
                o.scope, o.rule_id, verdict_of(o, key, order.id, local.customer.id, since_ms)
            )
            for o in outcomes
            if o.changes_ledger and o.scope
        ]
        snapshot = Snapshot(
            key,
            completed=order.completed_once,
            status=order.status,
            total=str(order.total),
            customer=local.customer.id,
        )
        return EventVerdicts(verdicts, revoke=gone or revoked, snapshot=snapshot)

    return judge


def _outcomes(
    ruleset: RuleSet, ctx: EventContext, delivery: str, rules_for: str | None, revoked: bool
) -> list[Outcome]:
    if rules_for is None:
        return evaluate(ruleset, ctx, delivery, revoked=revoked)
    # A fetched state: every rule that listens to any order event judges it.
    seen: set[str] = set()
    outcomes: list[Outcome] = []
    for event in sorted(e for e in ruleset.by_event if e.startswith("order.")):
        # `revokes` reads no more of the event than that it is about an order: one answer.
        at = dataclasses.replace(ctx, event=event)
        for outcome in evaluate(ruleset, at, delivery, revoked=revoked):
            if outcome.rule_id not in seen:
                seen.add(outcome.rule_id)
                outcomes.append(outcome)
    return outcomes


def event_moment(env: Envelope, fallback: dt.datetime) -> dt.datetime:
    """The `now` rules see for a webhook: its own stamp when readable (so the outcome depends
    on the events, not on when a worker got to them), else `fallback`."""
    at = event_time(env.created_at)
    return dt.datetime.fromtimestamp(at, dt.UTC) if at is not None else fallback
