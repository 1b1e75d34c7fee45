"""The ledger on a real Redis: only differences become grants; reversals come from the ledger."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from service import ledger
from service.rules.engine import Outcome

M = 555


def grant_outcome(points: int, rule: str = "purchase", reason: str = "order R1") -> Outcome:
    return Outcome(rule, "v1", "grant", points, reason, ("sms",), "test")


def no_match(rule: str = "purchase") -> Outcome:
    return Outcome(rule, "v1", "no_match", 0, "", ("sms",), "test")


async def apply(redis: Redis, *outcomes: Outcome, revoke_all: bool = False) -> list[ledger.Grant]:
    return await ledger.apply_outcomes(redis, M, "order:1", 42, outcomes, revoke_all=revoke_all)


class TestOrderState:
    """What an order deserves now, minus what it was granted, is what gets sent."""

    async def test_same_event_three_times_grants_once(self, redis: Redis) -> None:
        first = await apply(redis, grant_outcome(15))
        assert [(g.type, g.points) for g in first] == [("plus", 15)]
        assert await apply(redis, grant_outcome(15)) == []
        assert await apply(redis, grant_outcome(15)) == []
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 15}

    async def test_total_change_adjusts_by_the_difference(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        down = await apply(redis, grant_outcome(12))
        up = await apply(redis, grant_outcome(20))
        assert [(g.type, g.points) for g in down + up] == [("minus", 3), ("plus", 8)]
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 20}

    async def test_no_match_leaves_the_grant_alone(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        assert await apply(redis, no_match()) == []
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 15}

    async def test_revoke_takes_back_exactly_what_was_granted_even_for_deleted_rules(
        self, redis: Redis
    ) -> None:
        await apply(redis, grant_outcome(15), grant_outcome(5, rule="old_campaign", reason="camp"))
        # "old_campaign" no longer exists: revocation comes from the ledger, not from the rules.
        back = await apply(redis, no_match(), revoke_all=True)
        assert sorted((g.rule, g.type, g.points, g.reason) for g in back) == [
            ("old_campaign", "minus", 5, "Reversal: camp"),
            ("purchase", "minus", 15, "Reversal: order R1"),
        ]
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 0, "old_campaign": 0}

    async def test_completed_canceled_completed_grants_once_net(self, redis: Redis) -> None:
        sent = []
        sent += await apply(redis, grant_outcome(15))
        sent += await apply(redis, no_match(), revoke_all=True)
        sent += await apply(redis, grant_outcome(15))
        sent += await apply(redis, grant_outcome(15))
        assert sum(g.signed_points for g in sent) == 15
        assert len(sent) == 3

    async def test_points_above_salla_maximum_are_split(self, redis: Redis) -> None:
        grants = await apply(redis, grant_outcome(2_100_000))
        assert [g.points for g in grants] == [999_999, 999_999, 100_002]

    async def test_concurrent_workers_on_one_order_cannot_both_add(self, redis: Redis) -> None:
        results = await asyncio.gather(*(apply(redis, grant_outcome(15)) for _ in range(20)))
        assert sum(g.signed_points for grants in results for g in grants) == 15


class TestGrantStates:
    """pending → claimed → sending → sent, with recovery of dead workers' claims."""

    async def test_claim_is_exclusive(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        first, second = await asyncio.gather(
            ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000),
            ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000),
        )
        assert sorted([len(first), len(second)]) == [0, 1]

    async def test_sweep_returns_claimed_and_sends_sending_to_unknown(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        await ledger.apply_outcomes(redis, M, "order:2", 43, [grant_outcome(7)])
        claimed = await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=-1)
        sending = [g for g in claimed if g.customer == 43]
        await ledger.mark_sending(redis, M, sending, "b1")
        returned, unknown = await ledger.sweep_claims(redis, M)
        assert (returned, unknown) == (1, 1)
        assert [g.customer for g in await ledger.grants_in(redis, "pending", M)] == [42]
        [lost] = await ledger.grants_in(redis, "unknown", M)
        assert (lost.customer, lost.state) == (43, "unknown")

    async def test_parked_grants_come_back_on_unpark(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        claimed = await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000)
        await ledger.park(redis, M, claimed, "no token")
        assert await ledger.due_count(redis, M) == 0
        assert await ledger.unpark(redis, M) == 1
        assert await ledger.due_count(redis, M) == 1
