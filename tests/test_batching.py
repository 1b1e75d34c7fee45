"""Batching: the fewest calls, one customer at most once per call. Pure."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from service.delivery.batching import plan_batches
from service.ledger import Grant


def grant(n: int, customer: int, points: int = 10, reason: str = "r", kind: str = "plus") -> Grant:
    return Grant(
        id=f"1-g{n}",
        merchant=1,
        customer=customer,
        points=points,
        type=kind,  # type: ignore[arg-type]
        reason=reason,
        channels=("sms",),
        scope=f"order:{n}",
        rule="purchase",
        created_ms=n,
    )


class TestPlanBatches:
    """Grouping by (type, points, reason, channels), chunked by the per-call maximum."""

    def test_same_key_shares_a_call(self) -> None:
        batches = plan_batches([grant(1, 100), grant(2, 200), grant(3, 300)], 100)
        assert len(batches) == 1
        assert batches[0].customers == [100, 200, 300]

    def test_different_points_or_reason_split(self) -> None:
        batches = plan_batches(
            [grant(1, 100), grant(2, 200, points=5), grant(3, 300, reason="x")], 100
        )
        assert len(batches) == 3

    def test_chunked_by_max_customers(self) -> None:
        batches = plan_batches([grant(i, 1000 + i) for i in range(7)], 3)
        assert len(batches) == 3
        assert sorted(len(b.grants) for b in batches) == [2, 2, 3]

    def test_repeated_customer_needs_no_extra_call(self) -> None:
        batches = plan_batches([grant(1, 1), grant(2, 2), grant(3, 3), grant(4, 3)], 2)
        assert len(batches) == 2

    def test_a_customer_is_never_twice_in_one_call(self) -> None:
        batches = plan_batches([grant(1, 100), grant(2, 100), grant(3, 200)], 10)
        assert sorted(len(b.grants) for b in batches) == [1, 2]
        assert all(len(set(b.customers)) == len(b.customers) for b in batches)

    @given(
        st.lists(
            st.tuples(st.integers(1, 30), st.sampled_from([5, 10]), st.sampled_from(["a", "b"])),
            max_size=200,
        ),
        st.integers(1, 12),
    )
    def test_every_grant_once_and_calls_at_the_lower_bound(
        self, specs: list[tuple[int, int, str]], max_customers: int
    ) -> None:
        grants = [grant(i, c, p, r) for i, (c, p, r) in enumerate(specs)]
        batches = plan_batches(grants, max_customers)
        sent = Counter(g.id for b in batches for g in b.grants)
        assert sent == Counter(g.id for g in grants)
        assert all(len(b.grants) <= max_customers for b in batches)
        assert all(len(set(b.customers)) == len(b.customers) for b in batches)
        # The lower bound, per group: enough calls for its size and for its most repeated customer.
        bound = 0
        for key, size in Counter(g.group_key for g in grants).items():
            repeats = Counter(g.customer for g in grants if g.group_key == key).most_common(1)[0][1]
            bound += max(math.ceil(size / max_customers), repeats)
        assert len(batches) == bound
