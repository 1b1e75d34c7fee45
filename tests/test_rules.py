"""Rule files: loading, validation messages, and pure evaluation."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import RuleError
from service.events import Customer, EventContext, Order
from service.rules import evaluate, load_rules, parse_rules_text
from service.rules.model import round_points
from service.rules.testing import run_tests, simulate
from tests.conftest import fixture_json

RULES_DIR = Path(__file__).parent.parent / "rules"


def ruleset_of(text: str):  # type: ignore[no-untyped-def]
    return parse_rules_text(text, "test.yaml")


def order_ctx(total: str, status: str = "completed", event: str = "order.updated") -> EventContext:
    import datetime as dt

    return EventContext(
        event=event,
        merchant=1,
        now=dt.datetime.now(dt.UTC),
        order=Order(id=7, reference_id="R7", status=status, total=Decimal(total)),
        customer=Customer(id=42),
    )


class TestExampleRules:
    """The shipped rules/ load and give the documented points."""

    def test_they_load(self) -> None:
        ruleset = load_rules(RULES_DIR)
        assert {r.id for r in ruleset.rules} >= {"purchase", "review", "signup", "ramadan_double"}

    def test_completed_sample_order_earns_one_point_per_10_sar(self) -> None:
        result = simulate(load_rules(RULES_DIR), fixture_json("order.status.updated.json"))
        assert result.grants == [("purchase", 15, "plus")]  # 154 SAR, floored
        purchase = next(o for o in result.outcomes if o.rule_id == "purchase")
        assert purchase.reason == "نقاط الطلب رقم 42264"
        assert purchase.scope == "order:629263027"
        ramadan = next(o for o in result.outcomes if o.rule_id == "ramadan_double")
        assert ramadan.verdict == "inactive"

    def test_order_under_review_earns_nothing_yet(self) -> None:
        result = simulate(load_rules(RULES_DIR), fixture_json("order.created.json"))
        assert result.grants == []
        assert {o.verdict for o in result.outcomes} <= {"no_match", "inactive"}

    def test_review_earns_fixed_bonus(self) -> None:
        result = simulate(load_rules(RULES_DIR), fixture_json("review.added.json"))
        [outcome] = result.outcomes
        assert outcome.deserved == 50
        assert outcome.scope == "review:1289663293:1653503260"

    def test_canceled_order_revokes(self) -> None:
        result = simulate(load_rules(RULES_DIR), fixture_json("order.cancelled.derived.json"))
        assert result.revokes_order

    def test_store_override_replaces_and_disables(self) -> None:
        ruleset = load_rules(RULES_DIR)
        review = simulate(ruleset, fixture_json("review.added.json"), merchant=1000000001)
        assert review.grants == [("review", 100, "plus")]
        signup = simulate(
            ruleset, fixture_json("customer.created.derived.json"), merchant=1000000001
        )
        assert signup.outcomes == ()

    def test_every_example_rule_test_passes(self) -> None:
        results = run_tests(load_rules(RULES_DIR))
        assert results and all(r.ok for r in results), [r.failures for r in results if not r.ok]


class TestValidation:
    """A wrong rule file is refused with file, line and a sentence per problem."""

    BAD = """version: 1
rules:
  - id: x
    on: [order.creatd]
    when: order.totl > 1
    points: order.status
    type: plux
    reason: "{order.nope}"
    colour: red
"""

    def test_every_problem_is_reported_with_its_line(self) -> None:
        with pytest.raises(RuleError) as info:
            parse_rules_text(self.BAD, "bad.yaml")
        problems = "\n".join(info.value.problems)
        assert "bad.yaml:9: unknown key 'colour'" in problems
        assert "bad.yaml:4: unknown Salla event 'order.creatd'" in problems
        assert "bad.yaml:5: when uses unknown field 'totl'" in problems
        assert "bad.yaml:6: points must give a number, not string" in problems
        assert "bad.yaml:7: type must be 'plus' or 'minus'" in problems
        assert "bad.yaml:8: reason field {order.nope} uses unknown field 'nope'" in problems

    def test_syntax_and_type_errors(self) -> None:
        rule = "{id: a, on: order.created, points: 'order.total +', type: plus, reason: r}"
        text = f"version: 1\nrules:\n  - {rule}\n"
        with pytest.raises(RuleError, match="points does not parse"):
            parse_rules_text(text, "t.yaml")
        rule = (
            "{id: a, on: order.created, when: 'order.status + 1', points: 1, type: plus, reason: r}"
        )
        text = f"version: 1\nrules:\n  - {rule}\n"
        with pytest.raises(RuleError, match="not well typed"):
            parse_rules_text(text, "t.yaml")

    def test_broken_yaml_names_the_line(self) -> None:
        with pytest.raises(RuleError, match=r"t.yaml:4: not valid YAML"):
            parse_rules_text("version: 1\nrules:\n  - id: [\n", "t.yaml")

    def test_missing_keys_and_version(self) -> None:
        with pytest.raises(RuleError) as info:
            parse_rules_text("rules:\n  - id: a\n", "t.yaml")
        text = "\n".join(info.value.problems)
        assert "'version: 1' is required" in text
        assert "missing required key 'on'" in text

    def test_duplicate_ids_across_files(self, tmp_path: Path) -> None:
        rule = (
            "version: 1\nrules:\n  - {id: same, on: review.added, points: 1, type: plus, reason: r}"
        )
        (tmp_path / "a.yaml").write_text(rule)
        (tmp_path / "b.yaml").write_text(rule)
        with pytest.raises(RuleError, match="duplicate rule id 'same'"):
            load_rules(tmp_path)

    def test_missing_path(self, tmp_path: Path) -> None:
        with pytest.raises(RuleError, match="no such file"):
            load_rules(tmp_path / "nope")


class TestEvaluation:
    """Decimal points, one rounding step, signs for minus rules."""

    RULE = """version: 1
rules:
  - id: purchase
    on: [order.updated]
    when: order.status == "completed"
    points: order.total / 10
    rounding: {rounding}
    type: {type}
    reason: "order {{order.reference_id}}"
"""

    @pytest.mark.parametrize(
        ("rounding", "total", "expected"),
        [
            ("floor", "159.9", 15),
            ("ceil", "150.1", 16),
            ("half_up", "155", 16),
            ("half_up", "154.9", 15),
        ],
    )
    def test_rounding_modes(self, rounding: str, total: str, expected: int) -> None:
        ruleset = ruleset_of(self.RULE.format(rounding=rounding, type="plus"))
        [outcome] = evaluate(ruleset, order_ctx(total))
        assert outcome.deserved == expected
        assert outcome.reason == "order R7"

    def test_minus_rules_deserve_negative_points(self) -> None:
        ruleset = ruleset_of(self.RULE.format(rounding="floor", type="minus"))
        [outcome] = evaluate(ruleset, order_ctx("100"))
        assert outcome.deserved == -10

    def test_below_one_point_is_nothing(self) -> None:
        ruleset = ruleset_of(self.RULE.format(rounding="floor", type="plus"))
        [outcome] = evaluate(ruleset, order_ctx("9.99"))
        assert outcome.deserved == 0

    def test_rule_revokes_on_canceled(self) -> None:
        ruleset = ruleset_of(self.RULE.format(rounding="floor", type="plus"))
        [outcome] = evaluate(ruleset, order_ctx("100", status="canceled"))
        assert outcome.verdict == "revoke" and outcome.deserved == 0

    @given(total=st.decimals(min_value=0, max_value=10**7, places=2, allow_nan=False))
    def test_floor_never_exceeds_the_exact_value(self, total: Decimal) -> None:
        ruleset = ruleset_of(self.RULE.format(rounding="floor", type="plus"))
        [outcome] = evaluate(ruleset, order_ctx(str(total)))
        assert 0 <= outcome.deserved <= total / 10 < outcome.deserved + 1

    def test_round_points_is_explicit(self) -> None:
        assert round_points(Decimal("2.5"), "half_up") == 3
        assert round_points(Decimal("2.5"), "floor") == 2
        assert round_points(Decimal("2.1"), "ceil") == 3


def order_event(
    total: int = 200, status: str = "completed", groups: list[int] | None = None
) -> dict:  # type: ignore[type-arg]
    return {
        "event": "order.updated",
        "merchant": 1,
        "created_at": "",
        "data": {
            "id": 10,
            "reference_id": 1010,
            "status": {"slug": status},
            "amounts": {"total": {"amount": total}},
            "customer": {"id": 5, "groups": groups or []},
        },
    }


FEATURES = """version: 1
timezone: Asia/Riyadh
settings: {rate: 10}
rules:
  - id: weekend
    on: [order.updated]
    when: order.status == "completed"
    active: {from: 2026-03-01, until: 2026-03-31, days: [fri, sat]}
    points: 7
    type: plus
    reason: weekend
  - id: big
    priority: 10
    stop: true
    on: [order.updated]
    when: order.total >= 1000
    points: order.total / settings.rate
    caps: {per_grant: 50}
    type: plus
    reason: big
  - id: normal
    on: [order.updated]
    when: order.status == "completed"
    points: order.total / settings.rate
    once_per: customer
    type: plus
    reason: normal
"""


class TestFeatures:
    """Windows, priorities, caps, scopes and store settings, each as the docs say."""

    def test_active_window_uses_the_rule_timezone(self) -> None:
        ruleset = parse_rules_text(FEATURES, "f.yaml")
        # Thursday 23:30 UTC is Friday 02:30 in Riyadh: inside the window.
        inside = simulate(ruleset, order_event(), now="2026-03-05T23:30:00+00:00")
        outside = simulate(ruleset, order_event(), now="2026-03-05T20:00:00+00:00")
        assert ("weekend", 7, "plus") in inside.grants
        assert ("weekend", 7, "plus") not in outside.grants
        after = simulate(ruleset, order_event(), now="2026-04-03T12:00:00+03:00")
        assert ("weekend", 7, "plus") not in after.grants

    def test_priority_stop_and_cap_per_grant(self) -> None:
        ruleset = parse_rules_text(FEATURES, "f.yaml")
        result = simulate(ruleset, order_event(total=2000), now="2026-03-02T12:00:00+03:00")
        verdicts = {o.rule_id: o.verdict for o in result.outcomes}
        assert result.outcomes[0].rule_id == "big"
        assert result.grants == [("big", 50, "plus")]  # 200 capped at 50
        assert verdicts["normal"] == verdicts["weekend"] == "stopped"

    def test_once_per_customer_scope(self) -> None:
        ruleset = parse_rules_text(FEATURES, "f.yaml")
        result = simulate(ruleset, order_event(), now="2026-03-02T12:00:00+03:00")
        scopes = {o.rule_id: o.scope for o in result.outcomes}
        assert scopes["normal"] == "customer:5"
        assert scopes["weekend"] == "order:10"

    def test_store_settings_override_defaults_and_hostile_values_are_refused(self) -> None:
        ruleset = parse_rules_text(FEATURES, "f.yaml")
        good = simulate(ruleset, order_event(), settings={"rate": "20"}, now="2026-03-02T12:00:00")
        assert ("normal", 10, "plus") in good.grants
        for hostile in ("NaN", "1e999999", "0x10", "__import__('os')", [1], {"a": 1}, True):
            result = simulate(
                ruleset, order_event(), settings={"rate": hostile}, now="2026-03-02T12:00:00"
            )
            assert ("normal", 20, "plus") in result.grants, hostile
            assert result.problems, hostile

    def test_division_by_a_zero_setting_is_an_error_verdict_not_a_crash(self) -> None:
        ruleset = parse_rules_text(FEATURES, "f.yaml")
        result = simulate(ruleset, order_event(), settings={"rate": 0}, now="2026-03-02T12:00:00")
        normal = next(o for o in result.outcomes if o.rule_id == "normal")
        assert normal.verdict == "error" and result.grants == []

    def test_multipliers_apply_before_the_one_rounding(self) -> None:
        text = """version: 1
rules:
  - id: m
    on: [order.updated]
    points: order.total / 10
    rounding: floor
    type: plus
    reason: m
    multipliers:
      - {when: 7 in customer.groups, factor: 1.5}
"""
        ruleset = parse_rules_text(text, "m.yaml")
        assert simulate(ruleset, order_event(total=105, groups=[7])).grants == [("m", 15, "plus")]
        assert simulate(ruleset, order_event(total=105)).grants == [("m", 10, "plus")]

    def test_feature_validation_messages(self) -> None:
        text = """version: 1
rules:
  - id: x
    on: [order.updated]
    points: 1
    type: plus
    reason: r
    once_per: week
    hold_days: -1
    caps: {per_grant: 0, per_week: 3}
    active: {from: "2026-02-30", days: [funday]}
    multipliers: [{when: order.total, factor: 0}]
"""
        with pytest.raises(RuleError) as info:
            parse_rules_text(text, "x.yaml")
        problems = "\n".join(info.value.problems)
        with pytest.raises(RuleError, match=r"a value cannot be read: month must be in 1\.\.12"):
            parse_rules_text(text.replace('"2026-02-30"', "2026-13-01"), "y.yaml")
        for expected in (
            "x.yaml:8: once_per must be one of",
            "x.yaml:9: hold_days must be a number of days",
            "caps.per_grant must be a whole number of at least 1",
            "unknown cap 'per_week'",
            "active.from must be a date",
            "active.days must list days",
            "factor must be a number above 0",
        ):
            assert expected in problems, expected


class TestHostileExpressions:
    """No expression can run code, hang or crash evaluation: it is refused or gives `error`."""

    @pytest.mark.parametrize(
        "expression",
        [
            '__import__("os").system("id")',
            "order.__class__",
            "order.items.__class__.__mro__",
            '"a" * 1000000000',
            "10 ** 10 ** 10",
            "10 ** 999999",
            "-(10 ** 999999)",
            "(order.total ** 1000000) / 1",
            "order.total / 0",
            '$len("a")',
            "[i.total for i in order.items for j in order.items for k in order.items][0]",
        ],
    )
    def test_is_refused_or_errors(self, expression: str) -> None:
        text = (
            "version: 1\nrules:\n  - id: x\n    on: [order.updated]\n"
            f"    points: {expression!r}\n    type: plus\n    reason: r\n"
        )
        try:
            ruleset = parse_rules_text(text, "hostile.yaml")
        except RuleError:
            return  # refused before it could run
        result = simulate(ruleset, order_event())
        [outcome] = result.outcomes
        assert outcome.verdict == "error" or (outcome.verdict == "grant" and outcome.deserved == 0)
        assert result.grants == []
