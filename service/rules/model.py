"""Rules as data: frozen dataclasses built by the loader, read by the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any, Literal

import rule_engine

from service.events import EventContext

GrantType = Literal["plus", "minus"]
Rounding = Literal["floor", "ceil", "half_up"]

ROUNDING_MODES: dict[str, str] = {
    "floor": ROUND_FLOOR,
    "ceil": ROUND_CEILING,
    "half_up": ROUND_HALF_UP,
}
CHANNELS = frozenset({"email", "sms", "mobile"})
#: Salla's documented maximum for `points` in one call.
MAX_POINTS_PER_CALL = 999_999

TEMPLATE_FIELD = re.compile(r"\{([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\}")


def round_points(value: Decimal, mode: Rounding) -> int:
    """The one explicit rounding step from Decimal points to the integer Salla receives."""
    return int(value.quantize(Decimal(1), rounding=ROUNDING_MODES[mode]))


def render_template(template: str, ctx: EventContext) -> str:
    """Fill `{order.reference_id}`-style fields; the loader has checked every field exists."""

    def field(match: re.Match[str]) -> str:
        value: Any = ctx
        for part in match.group(1).split("."):
            value = getattr(value, part)
        return str(value)

    return TEMPLATE_FIELD.sub(field, template)


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    description: str
    on: frozenset[str]
    when: rule_engine.Rule | None
    points: rule_engine.Rule | Decimal
    type: GrantType
    reason: str
    channels: tuple[str, ...]
    rounding: Rounding
    revoke_when: rule_engine.Rule | None
    source: str  # "file:line", for messages and traces

    @property
    def version(self) -> str:
        """Identifies the rule's text, so the ledger can say which version granted what."""
        import hashlib

        text = "|".join(
            [
                self.when.text if self.when else "",
                self.points.text if isinstance(self.points, rule_engine.Rule) else str(self.points),
                self.type,
                self.reason,
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]
    #: Orders in these states give back everything the ledger says they were granted.
    revoke_when: rule_engine.Rule
    files: tuple[str, ...] = ()

    @property
    def events(self) -> frozenset[str]:
        """Every event some rule listens to."""
        return frozenset().union(*(r.on for r in self.rules)) if self.rules else frozenset()

    def uses(self, event: str) -> bool:
        """Whether processing `event` can change any grant.

        Any order event can revoke an order's grants (from the ledger, whatever the rules say
        now), so order events are used as soon as one rule is about orders.
        """
        events = self.events
        if event in events:
            return True
        return event.startswith("order.") and any(e.startswith("order.") for e in events)

    def for_event(self, event: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if event in r.on)
