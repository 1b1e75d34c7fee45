"""Rule files: loading, validation messages, and pure evaluation."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import RuleError
from service.events import Customer, EventContext, Order, normalise
from service.rules import evaluate, load_rules, parse_rules_text
from service.rules.engine import revokes, scope_of
from service.rules.model import round_points
from service.webhooks import parse_envelope
from tests.conftest import fixture_bytes

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
        assert {r.id for r in ruleset.rules} >= {"purchase", "review"}

    def test_completed_sample_order_earns_one_point_per_10_sar(self) -> None:
        ctx = normalise(parse_envelope(fixture_bytes("order.status.updated.json")))
        [outcome] = evaluate(load_rules(RULES_DIR), ctx)
        assert (outcome.verdict, outcome.deserved) == ("grant", 15)  # 154 SAR, floored
        assert outcome.reason == "نقاط الطلب رقم 42264"

    def test_order_under_review_earns_nothing_yet(self) -> None:
        ctx = normalise(parse_envelope(fixture_bytes("order.created.json")))
        [outcome] = evaluate(load_rules(RULES_DIR), ctx)
        assert outcome.verdict == "no_match" and outcome.deserved == 0

    def test_review_earns_fixed_bonus(self) -> None:
        ctx = normalise(parse_envelope(fixture_bytes("review.added.json")))
        [outcome] = evaluate(load_rules(RULES_DIR), ctx)
        assert outcome.deserved == 50
        assert scope_of(ctx) == "review:1289663293:1653503260"

    def test_canceled_order_revokes(self) -> None:
        ctx = normalise(parse_envelope(fixture_bytes("order.cancelled.derived.json")))
        assert revokes(load_rules(RULES_DIR), ctx)


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
