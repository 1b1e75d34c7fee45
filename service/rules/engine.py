"""Rule evaluation: an `EventContext` in, one `Outcome` per listening rule out. Pure.

An outcome says what one rule thinks a *scope* (an order, a review, a customer, a customer's
day) deserves now; the ledger turns the difference from what was already granted into grants.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import rule_engine

from service.events import EventContext
from service.rules.model import Rule, RuleSet, render_template, round_points

#: Points beyond this are a rule mistake (or hostile input), never a grant.
MAX_RULE_POINTS = Decimal(10) ** 12

Verdict = Literal["grant", "revoke", "no_match", "inactive", "no_customer", "stopped", "error"]


@dataclass(frozen=True, slots=True)
class Outcome:
    rule_id: str
    rule_version: str
    verdict: Verdict
    #: Signed points the scope deserves from this rule now (plus > 0, minus < 0).
    deserved: int
    reason: str
    channels: tuple[str, ...]
    why: str
    scope: str = ""
    hold_s: int = 0
    cap_per_customer_per_day: int | None = None
    day: str = ""  # the local date, for daily caps
    mode: str = ""  # "select_all": every customer of the store (campaigns)

    @property
    def changes_ledger(self) -> bool:
        return self.verdict in ("grant", "revoke")


def prepare(
    ruleset: RuleSet, ctx: EventContext, store_settings: Mapping[str, Any] | None = None
) -> tuple[EventContext, list[str]]:
    """Give `ctx` the store's settings and a local `now`; return problems with the settings."""
    settings, problems = ruleset.settings.build(store_settings)
    local = EventContext(
        event=ctx.event,
        merchant=ctx.merchant,
        now=ctx.now.astimezone(ruleset.timezone),
        order=ctx.order,
        customer=ctx.customer,
        review=ctx.review,
        settings=settings,
    )
    return local, problems


def scope_of(ctx: EventContext, rule: Rule | None = None, delivery: str = "") -> str:
    """What one grant is 'for': the ledger keeps one entry per (scope, rule)."""
    once_per = rule.once_per if rule is not None else None
    customer = ctx.customer.id
    if once_per == "customer":
        return f"customer:{customer}"
    if once_per == "customer_per_day":
        return f"customer:{customer}:day:{ctx.now.date().isoformat()}"
    if once_per == "event":
        return f"event:{delivery or ctx.event}"
    if once_per == "order" and ctx.has_order:
        return f"order:{ctx.order.id}"
    if once_per == "review" or (once_per is None and ctx.event.startswith("review.")):
        review = ctx.review
        return (
            f"review:{review.id}" if review.id else f"review:{review.order_id}:{review.product_id}"
        )
    if once_per is None and ctx.event.startswith("customer."):
        return f"customer:{customer}"
    if ctx.has_order:
        return f"order:{ctx.order.id}"
    return f"event:{delivery or ctx.event}"


def revokes(ruleset: RuleSet, ctx: EventContext) -> bool:
    """Whether the ruleset's revoke condition holds for this order event.

    It covers every rule the ledger recorded for the order, including rules deleted since.
    """
    return (
        ctx.has_order and ctx.event.startswith("order.") and bool(ruleset.revoke_when.matches(ctx))
    )


def _points(rule: Rule, ctx: EventContext) -> tuple[Decimal, str]:
    raw = rule.points.evaluate(ctx) if isinstance(rule.points, rule_engine.Rule) else rule.points
    points = Decimal(raw)
    applied = []
    for multiplier in rule.multipliers:
        if multiplier.when.matches(ctx):
            points *= multiplier.factor
            applied.append(
                f"x{multiplier.factor} ({multiplier.description or multiplier.when.text})"
            )
    return points, " ".join(applied)


def _evaluate_rule(
    rule: Rule, ctx: EventContext, default_revoke: bool, ruleset: RuleSet, delivery: str
) -> Outcome:
    def outcome(verdict: Verdict, deserved: int, why: str, reason: str = "") -> Outcome:
        return Outcome(
            rule.id,
            rule.version,
            verdict,
            deserved,
            reason,
            rule.channels,
            why,
            scope=scope_of(ctx, rule, delivery),
            hold_s=int(rule.hold_days * 86400),
            cap_per_customer_per_day=rule.cap_per_customer_per_day,
            day=ctx.now.date().isoformat(),
        )

    if ctx.customer.id == 0:
        return outcome("no_customer", 0, "the event names no customer")
    try:
        if rule.revoke_when is not None and (
            default_revoke
            if rule.revoke_when is ruleset.revoke_when
            else rule.revoke_when.matches(ctx)
        ):
            return outcome("revoke", 0, f"revoke_when holds: {rule.revoke_when.text}")
        if rule.active is not None and not rule.active.contains(ctx.now):
            return outcome(
                "inactive", 0, f"outside the rule's active window at {ctx.now:%Y-%m-%d %a}"
            )
        if rule.when is not None and not rule.when.matches(ctx):
            return outcome("no_match", 0, f"when is false: {rule.when.text}")
        points, multiplied = _points(rule, ctx)
        if not points.is_finite() or abs(points) > MAX_RULE_POINTS:
            return outcome("error", 0, f"points {points:.6g} are out of range (at most 1e12)")
        rounded = round_points(points, rule.rounding)
    except (rule_engine.EngineError, ArithmeticError) as exc:
        message = exc.message if isinstance(exc, rule_engine.EngineError) else repr(exc)
        return outcome("error", 0, f"evaluation failed: {message}")
    why = f"points {points} {multiplied} rounded ({rule.rounding}) to {rounded}".replace("  ", " ")
    if rule.cap_per_grant is not None and rounded > rule.cap_per_grant:
        rounded = rule.cap_per_grant
        why += f", capped per grant at {rule.cap_per_grant}"
    if rounded < 1:
        return outcome("grant", 0, f"{why}: below 1 point, nothing")
    sign = 1 if rule.type == "plus" else -1
    return outcome("grant", sign * rounded, why, render_template(rule.reason, ctx))


def evaluate(
    ruleset: RuleSet, ctx: EventContext, delivery: str = "", *, revoked: bool | None = None
) -> list[Outcome]:
    """One outcome per rule listening to `ctx.event`, in priority order.

    `ctx` should come from `prepare()` (settings and local time). A rule with `stop: true` that
    grants ends the evaluation: lower-priority rules get the verdict `stopped`. `revoked`:
    `revokes(ruleset, ctx)` when the caller already has it (it is a rule evaluation too).
    """
    default_revoke = revokes(ruleset, ctx) if revoked is None else revoked
    outcomes: list[Outcome] = []
    stopped_by = ""
    for rule in ruleset.for_event(ctx.event):
        if stopped_by:
            outcomes.append(
                Outcome(
                    rule.id,
                    rule.version,
                    "stopped",
                    0,
                    "",
                    rule.channels,
                    f"not evaluated: {stopped_by} matched with stop: true",
                )
            )
            continue
        result = _evaluate_rule(rule, ctx, default_revoke, ruleset, delivery)
        outcomes.append(result)
        if rule.stop and result.verdict == "grant" and result.deserved != 0:
            stopped_by = rule.id
    return outcomes


def at(moment: str | dt.datetime | None) -> dt.datetime:
    """Parse a test's `now` (ISO 8601); naive times are UTC."""
    if moment is None:
        return dt.datetime.now(dt.UTC)
    value = moment if isinstance(moment, dt.datetime) else dt.datetime.fromisoformat(moment)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
