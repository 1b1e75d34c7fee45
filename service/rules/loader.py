"""Load and validate rule files. Every problem is reported as `file:line: sentence`.

Format (version 1):

    version: 1
    revoke_when: order.status in ["canceled", "restored"]   # optional; this is the default
    rules:
      - id: purchase
        description: 1 point per 10 SAR on completed orders
        on: [order.created, order.updated, order.status.updated]
        when: order.status == "completed"
        points: order.total / 10
        type: plus                     # plus | minus
        reason: "Points for order {order.reference_id}"
        channels: [sms]                # email | sms | mobile; default none
        rounding: floor                # floor | ceil | half_up
        revoke_when: ...               # optional, per rule

Expressions use rule-engine (https://zeroSteiner.github.io/rule-engine/), type-checked against
`service.events.EventContext` at load time, with `Decimal` arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import rule_engine
import yaml

from service.errors import RuleError
from service.events import EventContext
from service.rules.model import CHANNELS, ROUNDING_MODES, TEMPLATE_FIELD, Rule, RuleSet

#: Events Salla documents (FACTS.md section 2); a rule listening to anything else is a typo.
KNOWN_EVENTS = frozenset(
    {
        "order.created", "order.updated", "order.status.updated", "order.cancelled",
        "order.refunded", "order.deleted", "order.products.updated", "order.payment.updated",
        "order.coupon.updated", "order.total.price.updated", "order.shipment.creating",
        "order.shipment.created", "order.shipment.cancelled", "order.shipment.return.creating",
        "order.shipment.return.created", "order.shipment.return.cancelled",
        "order.shipping.address.updated",
        "customer.created", "customer.updated", "customer.login", "customer.otp.request",
        "review.added", "invoice.created",
    }
)  # fmt: skip

DEFAULT_REVOKE_WHEN = 'order.status in ["canceled", "restored"]'
RULE_KEYS = frozenset(
    {"id", "description", "on", "when", "points", "type", "reason", "channels", "rounding",
     "revoke_when"}
)  # fmt: skip
REQUIRED_RULE_KEYS = ("id", "on", "points", "type", "reason")
FILE_KEYS = frozenset({"version", "rules", "revoke_when"})

_CONTEXT = rule_engine.Context(
    type_resolver=rule_engine.type_resolver_from_dataclass(EventContext),
    resolver=rule_engine.resolve_attribute,
    decimal_context=None,
)


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader whose mappings remember the line each key starts on.

    Booleans follow YAML 1.2 (`true`/`false` only), so the rule key `on:` stays a string
    instead of YAML 1.1's `True`.
    """


_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[str(key)] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _compile(text: object, where: str, what: str, problems: list[str]) -> rule_engine.Rule | None:
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: {what} must be an expression (a non-empty string)")
        return None
    try:
        return rule_engine.Rule(text, context=_CONTEXT)
    except rule_engine.RuleSyntaxError as exc:
        problems.append(f"{where}: {what} does not parse: {exc.message} in {text!r}")
    except rule_engine.AttributeResolutionError as exc:
        problems.append(f"{where}: {what} uses unknown field {exc.attribute_name!r} in {text!r}")
    except rule_engine.SymbolResolutionError as exc:
        problems.append(f"{where}: {what} uses unknown name {exc.symbol_name!r} in {text!r}")
    except rule_engine.EngineError as exc:
        problems.append(f"{where}: {what} is not well typed ({exc.message}) in {text!r}")
    return None


def _check_template(template: str, where: str, problems: list[str]) -> None:
    for match in TEMPLATE_FIELD.finditer(template):
        value_type: Any = EventContext
        for part in match.group(1).split("."):
            fields = getattr(value_type, "__dataclass_fields__", None)
            if fields is None or part not in fields:
                problems.append(f"{where}: reason uses unknown field {{{match.group(1)}}}")
                break
            value_type = fields[part].type
            if isinstance(value_type, str):  # postponed annotations: resolve our own classes
                import service.events as events_module

                value_type = getattr(events_module, value_type, None)


def _parse_rule(
    doc: Any, where: str, default_revoke: rule_engine.Rule | None, problems: list[str]
) -> Rule | None:
    if not isinstance(doc, dict):
        problems.append(f"{where}: a rule must be a mapping with id, on, points, type, reason")
        return None
    lines: dict[str, int] = doc.get("__lines__", {})
    file = where.rsplit(":", 1)[0]

    def at(key: str) -> str:
        return f"{file}:{lines.get(key, doc.get('__line__', 0))}"

    before = len(problems)
    unknown = sorted(k for k in doc if not k.startswith("__") and k not in RULE_KEYS)
    for key in unknown:
        problems.append(
            f"{at(key)}: unknown key {key!r}; known keys: {', '.join(sorted(RULE_KEYS))}"
        )
    missing = [key for key in REQUIRED_RULE_KEYS if key not in doc]
    for key in missing:
        problems.append(f"{where}: rule is missing required key {key!r}")
    if missing:
        return None

    rule_id = doc["id"]
    if not isinstance(rule_id, str) or not rule_id.replace("_", "").replace("-", "").isalnum():
        problems.append(f"{at('id')}: id must be a word of letters, digits, '-' or '_'")
    on_raw = doc["on"]
    on = [on_raw] if isinstance(on_raw, str) else on_raw
    if not isinstance(on, list) or not on or not all(isinstance(e, str) for e in on):
        problems.append(f"{at('on')}: on must be an event name or a list of them")
        on = []
    for event in on:
        if event not in KNOWN_EVENTS:
            problems.append(f"{at('on')}: unknown Salla event {event!r}")
    when = _compile(doc["when"], at("when"), "when", problems) if "when" in doc else None
    points_raw = doc["points"]
    points: rule_engine.Rule | Decimal | None
    if isinstance(points_raw, int | float) and not isinstance(points_raw, bool):
        points = Decimal(str(points_raw))
    elif isinstance(points_raw, str):
        try:
            points = Decimal(points_raw)
        except InvalidOperation:
            points = _compile(points_raw, at("points"), "points", problems)
            if points is not None and points.statement.expression.result_type not in (
                rule_engine.DataType.FLOAT,
                rule_engine.DataType.UNDEFINED,
            ):
                problems.append(
                    f"{at('points')}: points must give a number, not "
                    f"{points.statement.expression.result_type.name.lower()}"
                )
    else:
        problems.append(f"{at('points')}: points must be a number or an expression")
        points = None
    if isinstance(points, Decimal) and points < 0:
        problems.append(f"{at('points')}: points must not be negative; use type: minus")
    grant_type = doc["type"]
    if grant_type not in ("plus", "minus"):
        problems.append(f"{at('type')}: type must be 'plus' or 'minus', not {grant_type!r}")
    reason = doc["reason"]
    if not isinstance(reason, str) or not reason.strip():
        problems.append(f"{at('reason')}: reason must be a non-empty text")
    else:
        _check_template(reason, at("reason"), problems)
    channels = doc.get("channels", [])
    if not isinstance(channels, list) or not set(channels) <= CHANNELS:
        problems.append(f"{at('channels')}: channels must be a list of {sorted(CHANNELS)}")
    rounding = doc.get("rounding", "floor")
    if rounding not in ROUNDING_MODES:
        problems.append(f"{at('rounding')}: rounding must be one of {sorted(ROUNDING_MODES)}")
    listens_to_orders = any(e.startswith("order.") for e in on)
    revoke_when = (
        _compile(doc["revoke_when"], at("revoke_when"), "revoke_when", problems)
        if "revoke_when" in doc
        else (default_revoke if listens_to_orders else None)
    )
    if len(problems) > before or points is None:
        return None
    return Rule(
        id=rule_id,
        description=str(doc.get("description", "")),
        on=frozenset(on),
        when=when,
        points=points,
        type=grant_type,
        reason=reason,
        channels=tuple(channels),
        rounding=rounding,
        revoke_when=revoke_when,
        source=where,
    )


def parse_rules_text(
    text: str, name: str = "<rules>"
) -> tuple[list[Rule], rule_engine.Rule | None]:
    """Parse one rule file's text; raise `RuleError` listing every problem found."""
    problems: list[str] = []
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise RuleError(
            [f"{name}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]
        ) from None
    if not isinstance(doc, dict):
        raise RuleError([f"{name}:1: a rule file must be a mapping with 'version' and 'rules'"])
    lines = doc.get("__lines__", {})
    for key in sorted(k for k in doc if not k.startswith("__") and k not in FILE_KEYS):
        problems.append(f"{name}:{lines.get(key, 1)}: unknown top-level key {key!r}")
    if doc.get("version") != 1:
        problems.append(f"{name}:{lines.get('version', 1)}: 'version: 1' is required")
    revoke = None
    if "revoke_when" in doc:
        revoke = _compile(
            doc["revoke_when"], f"{name}:{lines['revoke_when']}", "revoke_when", problems
        )
    default_revoke = revoke or rule_engine.Rule(DEFAULT_REVOKE_WHEN, context=_CONTEXT)
    rules_doc = doc.get("rules")
    if not isinstance(rules_doc, list):
        problems.append(f"{name}:{lines.get('rules', 1)}: 'rules' must be a list of rules")
        rules_doc = []
    rules = []
    for item in rules_doc:
        line = item.get("__line__", 0) if isinstance(item, dict) else lines.get("rules", 0)
        rule = _parse_rule(item, f"{name}:{line}", default_revoke, problems)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise RuleError(problems)
    return rules, revoke


def _rule_files(path: Path) -> Iterable[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_rules(path: Path) -> RuleSet:
    """Load every `*.yaml`/`*.yml` under `path` (or the one file), all or nothing."""
    if not path.exists():
        raise RuleError([f"{path}: no such file or directory (set RULES_PATH)"])
    problems: list[str] = []
    rules: list[Rule] = []
    revoke: rule_engine.Rule | None = None
    files = list(_rule_files(path))
    for file in files:
        try:
            file_rules, file_revoke = parse_rules_text(file.read_text(encoding="utf-8"), str(file))
        except RuleError as exc:
            problems.extend(exc.problems)
            continue
        rules.extend(file_rules)
        revoke = revoke or file_revoke
    seen: dict[str, str] = {}
    for rule in rules:
        if rule.id in seen:
            problems.append(
                f"{rule.source}: duplicate rule id {rule.id!r} (first at {seen[rule.id]})"
            )
        seen.setdefault(rule.id, rule.source)
    if problems:
        raise RuleError(problems)
    return RuleSet(
        rules=tuple(rules),
        revoke_when=revoke or rule_engine.Rule(DEFAULT_REVOKE_WHEN, context=_CONTEXT),
        files=tuple(str(f) for f in files),
    )
