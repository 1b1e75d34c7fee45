"""Load and validate rule files (over 400 lines: one validator per key of the documented format,
kept together so the format and its checks read as one). Every problem is `file:line: sentence`.

The format is documented in docs/rules.md. Expressions use rule-engine
(https://zeroSteiner.github.io/rule-engine/), type-checked at load time against
`service.events.EventContext` plus the rule set's store settings, with `Decimal` arithmetic.
Loading is all or nothing: one problem anywhere refuses the whole set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import rule_engine
import yaml

from service import events as events_module
from service.errors import RuleError
from service.events import EventContext
from service.rules.model import (
    CHANNELS,
    ONCE_PER,
    ROUNDING_MODES,
    TEMPLATE_FIELD,
    WEEKDAYS,
    Active,
    MerchantOverride,
    Multiplier,
    Rule,
    RuleSet,
    RuleTest,
    SettingValue,
    StoreSettingsSchema,
    settings_schema,
)
from service.webhooks import STORE_EVENTS

#: Events Salla documents (FACTS.md section 2); a rule listening to anything else is a typo.
KNOWN_EVENTS = STORE_EVENTS

# Written with == rather than `in [...]`: rule-engine evaluates it ~2.5x faster.
DEFAULT_REVOKE_WHEN = 'order.status == "canceled" or order.status == "restored"'
DEFAULT_TIMEZONE = "Asia/Riyadh"
MERCHANTS_DIR = "merchants"
RULE_KEYS = frozenset(
    {
        "id",
        "description",
        "on",
        "when",
        "points",
        "type",
        "reason",
        "channels",
        "rounding",
        "revoke_when",
        "once_per",
        "hold_days",
        "caps",
        "active",
        "priority",
        "stop",
        "multipliers",
    }
)
REQUIRED_RULE_KEYS = ("id", "on", "points", "type", "reason")
FILE_KEYS = frozenset(
    {"version", "timezone", "defaults", "settings", "revoke_when", "rules", "tests"}
)
OVERRIDE_KEYS = frozenset({"version", "rules", "disable", "tests"})
TEST_KEYS = frozenset({"name", "event", "merchant", "settings", "now", "expect", "revokes"})


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
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
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


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def strip_lines(value: Any) -> Any:
    """The plain data of a loaded mapping, without the line bookkeeping."""
    if isinstance(value, dict):
        return {k: strip_lines(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [strip_lines(v) for v in value]
    return value


def context_for(schema: StoreSettingsSchema) -> rule_engine.Context:
    """The rule-engine context: EventContext's fields, with `settings` typed for this rule set."""
    fields_ = []
    for f in dataclasses.fields(EventContext):
        annotation = f.type
        if isinstance(annotation, str):
            annotation = eval(annotation, vars(events_module) | {"dt": dt})  # noqa: S307 - our own annotations
        fields_.append((f.name, schema.cls if f.name == "settings" else annotation))
    typed = dataclasses.make_dataclass("RuleContext", fields_)
    return rule_engine.Context(
        type_resolver=rule_engine.type_resolver_from_dataclass(typed),
        resolver=rule_engine.resolve_attribute,
    )


class _File:
    """One parsed YAML file and the problems found in it."""

    def __init__(self, path: str, text: str, problems: list[str]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {}
        try:
            doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 0
            problems.append(f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}")
            return
        except ValueError as exc:  # a value YAML recognises but cannot build, e.g. 2026-13-01
            problems.append(f"{path}: a value cannot be read: {exc}")
            return
        if not isinstance(doc, dict):
            problems.append(f"{path}:1: a rule file must be a mapping with 'version' and 'rules'")
            return
        self.doc = doc

    def at(self, key: str, mapping: dict[str, Any] | None = None) -> str:
        node = self.doc if mapping is None else mapping
        return f"{self.path}:{node.get('__lines__', {}).get(key, node.get('__line__', 1))}"


class _Compiler:
    """Compiles expressions and rules against one context, collecting problems."""

    def __init__(self, context: rule_engine.Context, problems: list[str]) -> None:
        self.context = context
        self.problems = problems

    def expression(self, text: object, where: str, what: str) -> rule_engine.Rule | None:
        if not isinstance(text, str) or not text.strip():
            self.problems.append(f"{where}: {what} must be an expression (a non-empty string)")
            return None
        try:
            return rule_engine.Rule(text, context=self.context)
        except rule_engine.RuleSyntaxError as exc:
            self.problems.append(f"{where}: {what} does not parse: {exc.message} in {text!r}")
        except rule_engine.AttributeResolutionError as exc:
            self.problems.append(
                f"{where}: {what} uses unknown field {exc.attribute_name!r} in {text!r}"
            )
        except rule_engine.SymbolResolutionError as exc:
            self.problems.append(
                f"{where}: {what} uses unknown name {exc.symbol_name!r} in {text!r}"
            )
        except rule_engine.EngineError as exc:
            self.problems.append(f"{where}: {what} is not well typed ({exc.message}) in {text!r}")
        return None

    def number_expression(
        self, text: object, where: str, what: str
    ) -> rule_engine.Rule | Decimal | None:
        if isinstance(text, int | float) and not isinstance(text, bool):
            return Decimal(str(text))
        if isinstance(text, str):
            try:
                return Decimal(text)
            except InvalidOperation:
                pass
        compiled = self.expression(text, where, what)
        if compiled is not None:
            result = compiled.statement.expression.result_type
            if result not in (rule_engine.DataType.FLOAT, rule_engine.DataType.UNDEFINED):
                self.problems.append(
                    f"{where}: {what} must give a number, not {result.name.lower()}"
                )
                return None
        return compiled


def _int(value: Any, where: str, what: str, problems: list[str], minimum: int = 0) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{where}: {what} must be a whole number of at least {minimum}")
        return None
    return value


def _date(value: Any, where: str, what: str, problems: list[str]) -> dt.date | None:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        problems.append(f"{where}: {what} must be a date like 2026-03-01")
        return None


def _parse_rule(
    doc: Any,
    file: _File,
    compiler: _Compiler,
    defaults: Mapping[str, Any],
    default_revoke: rule_engine.Rule,
) -> Rule | None:
    problems = compiler.problems
    if not isinstance(doc, dict):
        problems.append(f"{file.path}: a rule must be a mapping with id, on, points, type, reason")
        return None
    where = f"{file.path}:{doc.get('__line__', 0)}"

    def at(key: str) -> str:
        return file.at(key, doc)

    before = len(problems)
    for key in sorted(k for k in doc if not str(k).startswith("__") and k not in RULE_KEYS):
        problems.append(
            f"{at(key)}: unknown key {key!r}; known keys: {', '.join(sorted(RULE_KEYS))}"
        )
    missing = [key for key in REQUIRED_RULE_KEYS if key not in doc]
    for key in missing:
        problems.append(f"{where}: rule is missing required key {key!r}")
    if missing:
        return None

    rule_id = doc["id"]
    if not isinstance(rule_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rule_id):
        problems.append(f"{at('id')}: id must be 1-64 letters, digits, '-' or '_'")
    on_raw = doc["on"]
    on = [on_raw] if isinstance(on_raw, str) else on_raw
    if not isinstance(on, list) or not on or not all(isinstance(e, str) for e in on):
        problems.append(f"{at('on')}: on must be an event name or a list of them")
        on = []
    for event in on:
        if event not in KNOWN_EVENTS:
            problems.append(f"{at('on')}: unknown Salla event {event!r}")
    when = compiler.expression(doc["when"], at("when"), "when") if "when" in doc else None
    points = compiler.number_expression(doc["points"], at("points"), "points")
    if isinstance(points, Decimal) and points < 0:
        problems.append(f"{at('points')}: points must not be negative; use type: minus")
    grant_type = doc["type"]
    if grant_type not in ("plus", "minus"):
        problems.append(f"{at('type')}: type must be 'plus' or 'minus', not {grant_type!r}")
    reason = doc["reason"]
    if not isinstance(reason, str) or not reason.strip():
        problems.append(f"{at('reason')}: reason must be a non-empty text")
    else:
        for match in TEMPLATE_FIELD.finditer(reason):  # each {field} is checked as an expression
            compiler.expression(match.group(1), at("reason"), f"reason field {{{match.group(1)}}}")
    channels = doc.get("channels", defaults.get("channels", []))
    if not isinstance(channels, list) or not set(channels) <= CHANNELS:
        problems.append(f"{at('channels')}: channels must be a list of {sorted(CHANNELS)}")
        channels = []
    rounding = doc.get("rounding", defaults.get("rounding", "floor"))
    if rounding not in ROUNDING_MODES:
        problems.append(f"{at('rounding')}: rounding must be one of {sorted(ROUNDING_MODES)}")
    once_per = doc.get("once_per")
    if once_per is not None and once_per not in ONCE_PER:
        problems.append(f"{at('once_per')}: once_per must be one of {', '.join(ONCE_PER)}")
    hold_raw = doc.get("hold_days", 0)
    hold_days = Decimal(0)
    if (
        isinstance(hold_raw, bool)
        or not isinstance(hold_raw, int | float)
        or not 0 <= hold_raw <= 365
    ):
        problems.append(f"{at('hold_days')}: hold_days must be a number of days from 0 to 365")
    else:
        hold_days = Decimal(str(hold_raw))
    caps = doc.get("caps", {})
    cap_grant = cap_day = None
    if not isinstance(caps, dict):
        problems.append(f"{at('caps')}: caps must be a mapping (per_grant, per_customer_per_day)")
    else:
        for key in sorted(k for k in caps if not str(k).startswith("__")):
            if key not in ("per_grant", "per_customer_per_day"):
                problems.append(f"{file.at(key, caps)}: unknown cap {key!r}")
        if "per_grant" in caps:
            cap_grant = _int(
                caps["per_grant"], file.at("per_grant", caps), "caps.per_grant", problems, 1
            )
        if "per_customer_per_day" in caps:
            cap_day = _int(
                caps["per_customer_per_day"],
                file.at("per_customer_per_day", caps),
                "caps.per_customer_per_day",
                problems,
                1,
            )
    active = (
        _parse_active(doc.get("active"), file, at("active"), problems) if "active" in doc else None
    )
    priority = _int(doc.get("priority", 0), at("priority"), "priority", problems, -1000) or 0
    stop = doc.get("stop", False)
    if not isinstance(stop, bool):
        problems.append(f"{at('stop')}: stop must be true or false")
    multipliers = _parse_multipliers(doc.get("multipliers", []), file, at("multipliers"), compiler)
    listens_to_orders = any(e.startswith("order.") for e in on)
    revoke_when = (
        compiler.expression(doc["revoke_when"], at("revoke_when"), "revoke_when")
        if "revoke_when" in doc
        else (default_revoke if listens_to_orders else None)
    )
    if len(problems) > before or points is None:
        return None
    # duplicates: keyword construction, like the RuleSet below (only the shape is shared).
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
        once_per=once_per,
        hold_days=hold_days,
        cap_per_grant=cap_grant,
        cap_per_customer_per_day=cap_day,
        active=active,
        priority=priority,
        stop=stop,
        multipliers=tuple(multipliers),
    )


def _parse_active(raw: Any, file: _File, where: str, problems: list[str]) -> Active | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: active must be a mapping with from, until and/or days")
        return None
    for key in sorted(k for k in raw if not str(k).startswith("__")):
        if key not in ("from", "until", "days"):
            problems.append(
                f"{file.at(key, raw)}: unknown key {key!r} in active (from, until, days)"
            )
    start = (
        _date(raw["from"], file.at("from", raw), "active.from", problems) if "from" in raw else None
    )
    until = (
        _date(raw["until"], file.at("until", raw), "active.until", problems)
        if "until" in raw
        else None
    )
    if start and until and until < start:
        problems.append(f"{where}: active.until is before active.from")
    weekdays = frozenset(range(7))
    if "days" in raw:
        days = raw["days"]
        if not isinstance(days, list) or not days or not all(d in WEEKDAYS for d in days):
            problems.append(
                f"{file.at('days', raw)}: active.days must list days among {', '.join(WEEKDAYS)}"
            )
        else:
            weekdays = frozenset(WEEKDAYS.index(d) for d in days)
    return Active(start, until, weekdays)


def _parse_multipliers(raw: Any, file: _File, where: str, compiler: _Compiler) -> list[Multiplier]:
    if not isinstance(raw, list):
        compiler.problems.append(f"{where}: multipliers must be a list of {{when, factor}}")
        return []
    result = []
    for item in raw:
        if not isinstance(item, dict) or "when" not in item or "factor" not in item:
            compiler.problems.append(f"{where}: each multiplier needs when and factor")
            continue
        when = compiler.expression(item["when"], file.at("when", item), "multiplier when")
        factor = item["factor"]
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 100:
            compiler.problems.append(
                f"{file.at('factor', item)}: factor must be a number above 0, at most 100"
            )
            continue
        if when is not None:
            result.append(Multiplier(when, Decimal(str(factor)), str(item.get("description", ""))))
    return result


def _parse_settings(file: _File, problems: list[str]) -> dict[str, SettingValue]:
    raw = file.doc.get("settings", {})
    if not isinstance(raw, dict):
        problems.append(f"{file.at('settings')}: settings must be a mapping of name: default value")
        return {}
    values: dict[str, SettingValue] = {}
    for key, value in raw.items():
        if str(key).startswith("__"):
            continue
        where = file.at(key, raw)
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,63}", str(key)):
            problems.append(f"{where}: setting name {key!r} must be lower_case_with_underscores")
        elif isinstance(value, bool | str):
            values[key] = value
        elif isinstance(value, int | float):
            values[key] = Decimal(str(value))
        else:
            problems.append(
                f"{where}: setting {key!r} must default to a number, text or true/false"
            )
    return values


def _parse_tests(file: _File, problems: list[str]) -> list[RuleTest]:
    raw = file.doc.get("tests", [])
    if not isinstance(raw, list):
        problems.append(f"{file.at('tests')}: tests must be a list")
        return []
    tests = []
    base = Path(file.path).parent
    for item in raw:
        if not isinstance(item, dict):
            problems.append(f"{file.at('tests')}: each test must be a mapping")
            continue
        where = f"{file.path}:{item.get('__line__', 0)}"
        for key in sorted(k for k in item if not str(k).startswith("__") and k not in TEST_KEYS):
            problems.append(f"{file.at(key, item)}: unknown test key {key!r}")
        name = str(item.get("name", f"test at line {item.get('__line__', 0)}"))
        event = item.get("event")
        if isinstance(event, str) and event.strip():
            # Only `rules test` reads the file (testing.read_event): serving must start where
            # the examples it names were never copied (the image, a user's own folder).
            event = base / event
        elif isinstance(event, dict):
            event = strip_lines(event)
        else:
            problems.append(f"{where}: test {name!r} needs an event (a file path or a mapping)")
            continue
        expect = []
        for grant in item.get("expect", []) or []:
            if not isinstance(grant, dict) or not {"rule", "points"} <= set(grant):
                problems.append(
                    f"{file.at('expect', item)}: each expected grant needs rule and points"
                )
                continue
            expect.append(
                (str(grant["rule"]), int(grant["points"]), str(grant.get("type", "plus")))
            )
        try:
            now = dt.datetime.fromisoformat(str(item["now"])) if "now" in item else None
        except ValueError:
            problems.append(f"{file.at('now', item)}: now must be an ISO 8601 time")
            continue
        revokes = item.get("revokes")
        tests.append(
            RuleTest(
                name=name,
                source=where,
                event=event,
                expect=tuple(expect),
                merchant=item.get("merchant"),
                settings=strip_lines(item.get("settings", {})),
                now=now,
                revokes=revokes if isinstance(revokes, bool) else None,
            )
        )
    return tests


def _rule_files(path: Path) -> list[Path]:
    """The rule files under a folder, skipping hidden files and folders.

    A Kubernetes ConfigMap volume holds each file twice: `name.yaml`, a link into `..data/`,
    and the real file under a hidden `..<timestamp>/` folder. Reading both would refuse every
    rule as a duplicate of itself.
    """
    if path.is_file():
        return [path]
    found = []
    for file in path.rglob("*"):
        parts = file.relative_to(path).parts
        if (
            file.suffix in (".yaml", ".yml")
            and not any(part.startswith(".") for part in parts)
            and MERCHANTS_DIR not in parts[:-1]
            and file.is_file()
        ):
            found.append(file)
    return sorted(found)


def _override_files(path: Path) -> list[Path]:
    folder = path / MERCHANTS_DIR if path.is_dir() else path.parent / MERCHANTS_DIR
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith(".") and p.is_file()
    )


def load_rules(path: Path) -> RuleSet:
    """Load every rule file under `path` (or the one file), all or nothing."""
    if not path.exists():
        raise RuleError([f"{path}: no such file or directory (set RULES_PATH)"])
    texts = {str(p): p.read_text(encoding="utf-8") for p in _rule_files(path)}
    overrides = {str(p): p.read_text(encoding="utf-8") for p in _override_files(path)}
    return build_ruleset(texts, overrides)


def parse_rules_text(text: str, name: str = "<rules>") -> RuleSet:
    """A rule set from one file's text; raises `RuleError` listing every problem."""
    return build_ruleset({name: text}, {})


def build_ruleset(texts: Mapping[str, str], override_texts: Mapping[str, str]) -> RuleSet:
    problems: list[str] = []
    files = [_File(name, text, problems) for name, text in texts.items()]
    files = [f for f in files if f.doc]
    settings: dict[str, SettingValue] = {}
    timezone_name = ""
    revoke_sources: list[tuple[_File, Any]] = []
    for file in files:
        doc = file.doc
        for key in sorted(k for k in doc if not str(k).startswith("__") and k not in FILE_KEYS):
            problems.append(f"{file.at(key)}: unknown top-level key {key!r}")
        if doc.get("version") != 1:
            problems.append(f"{file.at('version')}: 'version: 1' is required")
        for key, value in _parse_settings(file, problems).items():
            if key in settings and settings[key] != value:
                problems.append(
                    f"{file.at('settings')}: setting {key!r} has another default elsewhere"
                )
            settings[key] = value
        if "timezone" in doc:
            if timezone_name and doc["timezone"] != timezone_name:
                problems.append(f"{file.at('timezone')}: timezone differs from another rule file's")
            timezone_name = str(doc["timezone"])
        if "revoke_when" in doc:
            revoke_sources.append((file, doc["revoke_when"]))
    try:
        timezone = ZoneInfo(timezone_name or DEFAULT_TIMEZONE)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"timezone {timezone_name!r} is not an IANA time zone (like Asia/Riyadh)")
        timezone = ZoneInfo(DEFAULT_TIMEZONE)
    schema = settings_schema(settings)
    compiler = _Compiler(context_for(schema), problems)
    default_revoke = rule_engine.Rule(DEFAULT_REVOKE_WHEN, context=compiler.context)
    for file, text in revoke_sources:
        compiled = compiler.expression(text, file.at("revoke_when"), "revoke_when")
        if compiled is not None:
            default_revoke = compiled
    rules: list[Rule] = []
    tests: list[RuleTest] = []
    for file in files:
        defaults = file.doc.get("defaults", {})
        if not isinstance(defaults, dict) or set(strip_lines(defaults)) - {"channels", "rounding"}:
            problems.append(f"{file.at('defaults')}: defaults may set channels and rounding only")
            defaults = {}
        rules_doc = file.doc.get("rules", [])
        if not isinstance(rules_doc, list):
            problems.append(f"{file.at('rules')}: 'rules' must be a list of rules")
            rules_doc = []
        for item in rules_doc:
            rule = _parse_rule(item, file, compiler, defaults, default_revoke)
            if rule is not None:
                rules.append(rule)
        tests.extend(_parse_tests(file, problems))
    _check_duplicates(rules, problems)
    merchant_overrides = _parse_overrides(override_texts, compiler, default_revoke, rules, tests)
    if problems:
        raise RuleError(problems)
    order = {rule.id: index for index, rule in enumerate(rules)}
    rules.sort(key=lambda r: (-r.priority, order[r.id]))
    # duplicates: keyword construction, like Rule above (only the shape is shared).
    return RuleSet(
        rules=tuple(rules),
        revoke_when=default_revoke,
        timezone=timezone,
        settings=schema,
        overrides=merchant_overrides,
        tests=tuple(tests),
        files=tuple(texts) + tuple(override_texts),
    )


def _check_duplicates(rules: Iterable[Rule], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for rule in rules:
        if rule.id in seen:
            problems.append(
                f"{rule.source}: duplicate rule id {rule.id!r} (first at {seen[rule.id]})"
            )
        seen.setdefault(rule.id, rule.source)


def _parse_overrides(
    texts: Mapping[str, str],
    compiler: _Compiler,
    default_revoke: rule_engine.Rule,
    base_rules: list[Rule],
    tests: list[RuleTest],
) -> dict[int, MerchantOverride]:
    problems = compiler.problems
    base_ids = {rule.id for rule in base_rules}
    overrides: dict[int, MerchantOverride] = {}
    for name, text in texts.items():
        stem = Path(name).stem
        if not stem.isdigit():
            problems.append(f"{name}:1: a store override file is named <merchant-id>.yaml")
            continue
        file = _File(name, text, problems)
        if not file.doc:
            continue
        for key in sorted(
            k for k in file.doc if not str(k).startswith("__") and k not in OVERRIDE_KEYS
        ):
            problems.append(f"{file.at(key)}: unknown key {key!r} in a store override file")
        disable = file.doc.get("disable", [])
        if not isinstance(disable, list) or not all(isinstance(d, str) for d in disable):
            problems.append(f"{file.at('disable')}: disable must be a list of rule ids")
            disable = []
        for rule_id in disable:
            if rule_id not in base_ids:
                problems.append(f"{file.at('disable')}: disable names unknown rule {rule_id!r}")
        rules = []
        for item in file.doc.get("rules", []) or []:
            rule = _parse_rule(item, file, compiler, {}, default_revoke)
            if rule is not None:
                rules.append(rule)
        _check_duplicates(rules, problems)
        merchant = int(stem)
        overrides[merchant] = MerchantOverride(merchant, tuple(rules), frozenset(disable), name)
        tests.extend(
            dataclasses.replace(test, merchant=test.merchant or merchant)
            for test in _parse_tests(file, problems)
        )
    return overrides
