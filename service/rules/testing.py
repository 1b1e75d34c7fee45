"""Running the `tests:` of rule files, and simulating one event. Pure: no Redis, no HTTP."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import InvalidPayload
from service.events import normalise
from service.rules.engine import Outcome, at, evaluate, prepare, revokes
from service.rules.model import RuleSet, RuleTest
from service.webhooks import parse_envelope


@dataclass(frozen=True, slots=True)
class Simulation:
    merchant: int
    event: str
    outcomes: tuple[Outcome, ...]
    revokes_order: bool
    problems: tuple[str, ...]

    @property
    def grants(self) -> list[tuple[str, int, str]]:
        """(rule, points, type) of every outcome that deserves points."""
        return sorted(
            (o.rule_id, abs(o.deserved), "plus" if o.deserved > 0 else "minus")
            for o in self.outcomes
            if o.verdict == "grant" and o.deserved != 0
        )


def simulate(
    ruleset: RuleSet,
    event: Mapping[str, Any],
    *,
    merchant: int | None = None,
    settings: Mapping[str, Any] | None = None,
    now: Any = None,
) -> Simulation:
    """What one event would produce for a store, with a trace per rule."""
    doc = dict(event)
    if merchant is not None:
        doc["merchant"] = merchant
    env = parse_envelope(json.dumps(doc, default=str).encode())
    store_rules = ruleset.for_merchant(env.merchant)
    ctx, problems = prepare(store_rules, normalise(env, now=at(now)), settings)
    outcomes = evaluate(store_rules, ctx)
    return Simulation(
        env.merchant, env.event, tuple(outcomes), revokes(store_rules, ctx), tuple(problems)
    )


@dataclass(frozen=True, slots=True)
class TestResult:
    test: RuleTest
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def read_event(test: RuleTest) -> Mapping[str, Any]:
    """The test's event: written inline, or read from the file it names (only here).

    Raises `ValueError` with a sentence naming the test and the file when the file is missing
    or not a JSON object.
    """
    if not isinstance(test.event, Path):
        return test.event
    try:
        doc = json.loads(test.event.read_bytes())
    except FileNotFoundError:
        raise ValueError(
            f"the event file {test.event} does not exist (a test's event path is relative to "
            "its rule file)"
        ) from None
    except OSError as exc:
        raise ValueError(f"the event file {test.event} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"the event file {test.event} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"the event file {test.event} must hold a JSON object (a webhook body)")
    return doc


def run_tests(ruleset: RuleSet) -> list[TestResult]:
    results = []
    for test in ruleset.tests:
        failures = []
        try:
            event = read_event(test)
        except ValueError as exc:
            results.append(TestResult(test, (str(exc),)))
            continue
        try:
            result = simulate(
                ruleset, event, merchant=test.merchant, settings=test.settings, now=test.now
            )
        except (InvalidPayload, ValueError, TypeError) as exc:  # a broken event fails its test
            results.append(TestResult(test, (f"the event could not be evaluated: {exc}",)))
            continue
        expected = sorted(test.expect)
        if result.grants != expected:
            failures.append(f"expected grants {expected}, got {result.grants}")
        if test.revokes is not None and result.revokes_order != test.revokes:
            failures.append(f"expected revokes: {test.revokes}, got {result.revokes_order}")
        failures.extend(f"store settings: {p}" for p in result.problems)
        for outcome in result.outcomes:
            if outcome.verdict == "error":
                failures.append(f"rule {outcome.rule_id}: {outcome.why}")
        results.append(TestResult(test, tuple(failures)))
    return results
