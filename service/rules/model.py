"""Rules as data: frozen dataclasses built by the loader, read by the engine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import rule_engine

from service.events import EventContext

GrantType = Literal["plus", "minus"]
Rounding = Literal["floor", "ceil", "half_up"]
OncePer = Literal["order", "customer", "customer_per_day", "event", "review"]

ROUNDING_MODES: dict[str, str] = {
    "floor": ROUND_FLOOR,
    "ceil": ROUND_CEILING,
    "half_up": ROUND_HALF_UP,
}
ONCE_PER = ("order", "customer", "customer_per_day", "event", "review")
CHANNELS = frozenset({"email", "sms", "mobile"})
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Salla's documented maximum for `points` in one call.
MAX_POINTS_PER_CALL = 999_999

TEMPLATE_FIELD = re.compile(r"\{([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\}")

SettingValue = Decimal | str | bool


def round_points(value: Decimal, mode: Rounding) -> int:
    """The one explicit rounding step from Decimal points to the integer Salla receives."""
    return int(value.quantize(Decimal(1), rounding=ROUNDING_MODES[mode]))


def render_template(template: str, ctx: EventContext) -> str:
    """Fill `{order.reference_id}`-style fields; the loader has checked every field exists."""

    def fill(match: re.Match[str]) -> str:
        value: Any = ctx
        for part in match.group(1).split("."):
            value = getattr(value, part)
        return str(value)

    return TEMPLATE_FIELD.sub(fill, template)


@dataclass(frozen=True, slots=True)
class Active:
    """When a rule applies, in the rule set's timezone. Dates are inclusive."""

    start: dt.date | None = None
    until: dt.date | None = None
    weekdays: frozenset[int] = frozenset(range(7))  # 0 = Monday

    def contains(self, moment: dt.datetime) -> bool:
        day = moment.date()
        if self.start is not None and day < self.start:
            return False
        if self.until is not None and day > self.until:
            return False
        return moment.weekday() in self.weekdays


@dataclass(frozen=True, slots=True)
class Multiplier:
    when: rule_engine.Rule
    factor: Decimal
    description: str = ""


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
    once_per: OncePer | None = None  # None: by event family (order, review, customer, event)
    hold_days: Decimal = Decimal(0)
    cap_per_grant: int | None = None
    cap_per_customer_per_day: int | None = None
    active: Active | None = None
    priority: int = 0
    stop: bool = False
    multipliers: tuple[Multiplier, ...] = ()

    #: Identifies the rule's text, so the ledger can say which version granted what.
    version: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        parts = [
            self.when.text if self.when else "",
            self.points.text if isinstance(self.points, rule_engine.Rule) else str(self.points),
            self.type,
            self.reason,
            ",".join(f"{m.when.text}*{m.factor}" for m in self.multipliers),
            str(self.cap_per_grant),
        ]
        digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
        object.__setattr__(self, "version", digest)


@dataclass(frozen=True, slots=True)
class RuleTest:
    """An example in a rule file: an event and the grants it must produce.

    `event` is the event written inline, or the file the test names (resolved against the rule
    file's folder). That file is read only when the test runs (`salla-rewards rules test`):
    serving never needs it, and deployments ship `rules/` without the examples it points at.
    """

    name: str
    source: str
    event: Mapping[str, Any] | Path
    expect: tuple[tuple[str, int, str], ...]  # (rule id, points, type)
    merchant: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    now: dt.datetime | None = None
    revokes: bool | None = None


@dataclass(frozen=True, slots=True)
class StoreSettingsSchema:
    """The store settings rules may read: names, default values, and the class rules see."""

    defaults: Mapping[str, SettingValue]
    cls: type
    default_instance: Any = None

    def build(self, overrides: Mapping[str, Any] | None = None) -> tuple[Any, list[str]]:
        """A settings object from defaults plus a store's values; bad values keep the default.

        Store values come from `app.settings.updated`, i.e. from the merchant: each is coerced
        to the type of its default, and anything that does not fit is refused with a sentence.
        """
        if not overrides:
            return self.default_instance, []
        values = dict(self.defaults)
        problems: list[str] = []
        for key, raw in overrides.items():
            if key not in self.defaults:
                continue
            default = self.defaults[key]
            coerced = coerce_setting(raw, default)
            if coerced is None:
                problems.append(f"setting {key!r}: {raw!r} is not a {type(default).__name__}")
            else:
                values[key] = coerced
        return self.cls(**values), problems


def coerce_setting(raw: Any, default: SettingValue) -> SettingValue | None:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "on", "off"):
            return raw.lower() in ("true", "1", "on")
        return None
    if isinstance(default, Decimal):
        if isinstance(raw, bool):
            return None
        if isinstance(raw, int | float | Decimal | str):
            try:
                value = Decimal(str(raw).strip())
            except InvalidOperation:
                return None
            # Bounded so that merchant input cannot blow up arithmetic.
            return value if value.is_finite() and abs(value) <= Decimal(10) ** 12 else None
        return None
    return str(raw)[:500] if isinstance(raw, str | int | float) else None


def settings_schema(defaults: Mapping[str, SettingValue]) -> StoreSettingsSchema:
    fields_ = [(name, type(value)) for name, value in sorted(defaults.items())]
    cls = dataclasses.make_dataclass("StoreSettings", fields_, frozen=True, slots=True)
    return StoreSettingsSchema(dict(defaults), cls, cls(**defaults))


@dataclass(frozen=True, slots=True)
class MerchantOverride:
    merchant: int
    rules: tuple[Rule, ...]  # added, or replacing the base rule with the same id
    disable: frozenset[str]
    source: str


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]  # in evaluation order: priority (high first), then file order
    #: Orders in these states give back everything the ledger says they were granted.
    revoke_when: rule_engine.Rule
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Riyadh"))
    settings: StoreSettingsSchema = field(default_factory=lambda: settings_schema({}))
    overrides: Mapping[int, MerchantOverride] = field(default_factory=dict)
    tests: tuple[RuleTest, ...] = ()
    files: tuple[str, ...] = ()
    by_event: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict, compare=False)
    _per_merchant: dict[int, RuleSet] = field(default_factory=dict, compare=False, repr=False)
    #: `events` and whether one of them is an order event, computed once (the web asks per
    #: webhook).
    _events: frozenset[str] = field(default=frozenset(), init=False, compare=False, repr=False)
    _orders: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for event in rule.on:
                index.setdefault(event, []).append(rule)
        object.__setattr__(self, "by_event", {e: tuple(r) for e, r in index.items()})
        events = set(self.by_event)
        for override in self.overrides.values():
            for rule in override.rules:
                events |= rule.on
        object.__setattr__(self, "_events", frozenset(events))
        object.__setattr__(self, "_orders", any(e.startswith("order.") for e in events))

    @property
    def events(self) -> frozenset[str]:
        """Every event some rule listens to, in any store."""
        return self._events

    def uses(self, event: str) -> bool:
        """Whether processing `event` can change any grant.

        Any order event can revoke an order's grants (from the ledger, whatever the rules say
        now), so order events are used as soon as one rule is about orders.
        """
        return event in self._events or (self._orders and event.startswith("order."))

    def for_event(self, event: str) -> tuple[Rule, ...]:
        return self.by_event.get(event, ())

    def for_merchant(self, merchant: int) -> RuleSet:
        """The rules one store runs: the base rules with its override file applied."""
        override = self.overrides.get(merchant)
        if override is None:
            return self
        cached = self._per_merchant.get(merchant)
        if cached is not None:
            return cached
        replaced = {rule.id: rule for rule in override.rules}
        rules = [
            replaced.pop(rule.id, rule) for rule in self.rules if rule.id not in override.disable
        ]
        rules.extend(replaced.values())
        order = {rule.id: index for index, rule in enumerate(rules)}
        rules.sort(key=lambda r: (-r.priority, order[r.id]))
        merged = dataclasses.replace(self, rules=tuple(rules), overrides={}, _per_merchant={})
        self._per_merchant[merchant] = merged
        return merged
