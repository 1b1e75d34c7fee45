"""Rule evaluation: an `EventContext` in, one `Outcome` per listening rule out. Pure.

An outcome says what the event's subject (an order, a review, a customer) *deserves now* from
one rule; the ledger turns the difference from what was already granted into a grant.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import rule_engine

from service.events import EventContext
from service.rules.model import Rule, RuleSet, render_template, round_points

Verdict = Literal["grant", "revoke", "no_match", "no_customer", "error"]


@dataclass(frozen=True, slots=True)
class Outcome:
    rule_id: str
    rule_version: str
    verdict: Verdict
    #: Signed points the subject deserves from this rule now (plus > 0, minus < 0).
    deserved: int
    reason: str
    channels: tuple[str, ...]
    why: str

    @property
    def changes_ledger(self) -> bool:
        return self.verdict in ("grant", "revoke")


def scope_of(ctx: EventContext) -> str:
    """What one grant is 'for': the ledger keeps one entry per (scope, rule)."""
    if ctx.event.startswith("review."):
        review = ctx.review
        return (
            f"review:{review.id}" if review.id else f"review:{review.order_id}:{review.product_id}"
        )
    if ctx.event.startswith("customer."):
        return f"customer:{ctx.customer.id}"
    if ctx.has_order:
        return f"order:{ctx.order.id}"
    return f"event:{ctx.event}"


def revokes(ruleset: RuleSet, ctx: EventContext) -> bool:
    """Whether the ruleset's default revoke condition holds (it covers rules deleted since)."""
    return ctx.has_order and bool(ruleset.revoke_when.matches(ctx))


def _evaluate_rule(rule: Rule, ctx: EventContext) -> Outcome:
    def outcome(verdict: Verdict, deserved: int, why: str, reason: str = "") -> Outcome:
        return Outcome(rule.id, rule.version, verdict, deserved, reason, rule.channels, why)

    if ctx.customer.id == 0:
        return outcome("no_customer", 0, "the event names no customer")
    try:
        if rule.revoke_when is not None and rule.revoke_when.matches(ctx):
            return outcome("revoke", 0, f"revoke_when holds: {rule.revoke_when.text}")
        if rule.when is not None and not rule.when.matches(ctx):
            return outcome("no_match", 0, f"when is false: {rule.when.text}")
        raw = (
            rule.points.evaluate(ctx) if isinstance(rule.points, rule_engine.Rule) else rule.points
        )
    except rule_engine.EngineError as exc:
        return outcome("error", 0, f"evaluation failed: {exc.message}")
    points = Decimal(raw)
    rounded = round_points(points, rule.rounding)
    if rounded < 1:
        return outcome("grant", 0, f"points {points} round ({rule.rounding}) below 1: nothing")
    sign = 1 if rule.type == "plus" else -1
    return outcome(
        "grant",
        sign * rounded,
        f"points {points} rounded ({rule.rounding}) to {rounded}",
        render_template(rule.reason, ctx),
    )


def evaluate(ruleset: RuleSet, ctx: EventContext) -> list[Outcome]:
    """One outcome per rule listening to `ctx.event`, in file order."""
    return [_evaluate_rule(rule, ctx) for rule in ruleset.for_event(ctx.event)]
