"""Normalisation: every Salla shape reads the same to a rule."""

from __future__ import annotations

from decimal import Decimal

from service.events import normalise, to_decimal
from service.webhooks import parse_envelope
from tests.conftest import fixture_bytes


def ctx_of(name: str):  # type: ignore[no-untyped-def]
    return normalise(parse_envelope(fixture_bytes(name)))


class TestOrders:
    """The order is found at `data` or at `data.order`, and reads the same."""

    def test_status_updated_reads_the_nested_order(self) -> None:
        ctx = ctx_of("order.status.updated.json")
        assert ctx.order.id == 629263027
        assert ctx.order.status == "completed"  # the slug, not the Arabic name in data.status
        assert ctx.order.total == Decimal(154)
        assert ctx.order.shipping == Decimal(33)
        assert ctx.order.loyalty_prize == Decimal("126.00")
        assert ctx.customer.id == 1779795066

    def test_created_reads_the_order_at_data(self) -> None:
        ctx = ctx_of("order.created.json")
        assert (ctx.order.id, ctx.order.status) == (2116149737, "under_review")
        assert ctx.order.total == Decimal(196)
        assert ctx.customer.id == 225167971
        assert all(isinstance(item.total, Decimal) for item in ctx.order.items)

    def test_amount_formats(self) -> None:
        assert to_decimal("5.00") == Decimal("5.00")
        assert to_decimal({"amount": "1600", "currency": "SAR"}) == Decimal(1600)
        assert to_decimal(175.47) == Decimal("175.47")
        assert to_decimal("NaN") == Decimal(0)
        assert to_decimal(None) == Decimal(0)
        assert to_decimal(True) == Decimal(0)


class TestReviews:
    """review.added sends ids, ratings and amounts as strings."""

    def test_strings_become_numbers(self) -> None:
        ctx = ctx_of("review.added.json")
        assert ctx.review.rating == Decimal(5)
        assert ctx.review.product_id == 1653503260
        assert ctx.customer.id == 2107468057
        assert ctx.order.total == Decimal(3732)


class TestOthers:
    def test_customer_event(self) -> None:
        ctx = ctx_of("customer.login.json")
        assert ctx.customer.id == 225167971
        assert not ctx.has_order

    def test_unknown_shape_gives_empty_parts(self) -> None:
        ctx = normalise(parse_envelope(b'{"event":"order.created","merchant":1,"data":{"x":1}}'))
        assert ctx.order.id == 0 and ctx.customer.id == 0 and ctx.order.total == 0
