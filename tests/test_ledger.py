"""The ledger on a real Redis: only differences become grants; reversals come from the ledger."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from service import keys, ledger
from service.ledger.commit import Writes, commit
from service.rules.engine import Outcome
from tests.support.outcomes import grant_outcome, no_match

M = 555


async def apply(
    redis: Redis, *outcomes: Outcome, revoke_all: bool = False, customer: int = 42
) -> list[ledger.Grant]:
    return await ledger.apply_outcomes(
        redis, M, outcomes, customer=customer, order_id=1, revoke_order=revoke_all
    )


async def send_all(redis: Redis, grants: list[ledger.Grant]) -> None:
    """Walk grants through claim → sending → sent, as a flush would."""
    claimed = (
        await ledger.claim_due(redis, M, limit=100, claim_timeout_ms=60_000, token="t")
    ).grants
    mine = [g for g in claimed if g.id in {x.id for x in grants}]
    await ledger.mark_sending(redis, M, mine, "batch", token="t")
    await ledger.finish(redis, M, mine, "sent")


class TestOrderState:
    """What an order deserves now, minus what it was granted, is what gets sent."""

    async def test_same_event_three_times_grants_once(self, redis: Redis) -> None:
        first = await apply(redis, grant_outcome(15))
        assert [(g.type, g.points) for g in first] == [("plus", 15)]
        assert await apply(redis, grant_outcome(15)) == []
        assert await apply(redis, grant_outcome(15)) == []
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 15}

    async def test_total_change_after_sending_adjusts_by_the_difference(self, redis: Redis) -> None:
        await send_all(redis, await apply(redis, grant_outcome(15)))
        down = await apply(redis, grant_outcome(12))
        await send_all(redis, down)
        up = await apply(redis, grant_outcome(20))
        assert [(g.type, g.points) for g in down + up] == [("minus", 3), ("plus", 8)]
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 20}

    async def test_total_change_before_sending_replaces_the_unsent_grant(
        self, redis: Redis
    ) -> None:
        [first] = await apply(redis, grant_outcome(15))
        [replacement] = await apply(redis, grant_outcome(12))
        assert (replacement.type, replacement.points) == ("plus", 12)
        [netted] = await ledger.load(redis, [first.id])
        assert netted.state == "netted"
        assert [g.id for g in await ledger.grants_in(redis, "pending", M)] == [replacement.id]

    async def test_revoke_before_sending_sends_nothing(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        assert await apply(redis, no_match(), revoke_all=True) == []
        assert await ledger.grants_in(redis, "pending", M) == []

    async def test_no_match_leaves_the_grant_alone(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        assert await apply(redis, no_match()) == []
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 15}

    async def test_revoke_takes_back_exactly_what_was_granted_even_for_deleted_rules(
        self, redis: Redis
    ) -> None:
        granted = await apply(
            redis, grant_outcome(15), grant_outcome(5, rule="old_campaign", reason="camp")
        )
        await send_all(redis, granted)
        # "old_campaign" no longer exists: revocation comes from the ledger, not from the rules.
        back = await apply(redis, no_match(), revoke_all=True)
        assert sorted((g.rule, g.type, g.points, g.reason) for g in back) == [
            ("old_campaign", "minus", 5, "Reversal: camp"),
            ("purchase", "minus", 15, "Reversal: order R1"),
        ]
        assert await ledger.entry(redis, M, "order:1") == {"purchase": 0, "old_campaign": 0}

    async def test_completed_canceled_completed_grants_once_net(self, redis: Redis) -> None:
        made = []
        for step in (grant_outcome(15), None, grant_outcome(15), grant_outcome(15)):
            grants = await (
                apply(redis, step) if step else apply(redis, no_match(), revoke_all=True)
            )
            await send_all(redis, grants)
            made += grants
        assert sum(g.signed_points for g in made) == 15
        assert [(g.type, g.points) for g in made] == [("plus", 15), ("minus", 15), ("plus", 15)]

    async def test_cancel_during_hold_sends_nothing(self, redis: Redis) -> None:
        [held] = await apply(redis, grant_outcome(15, hold_s=14 * 86400))
        assert held.due_ms > ledger.now_ms() + 13 * 86400 * 1000
        assert await apply(redis, no_match(), revoke_all=True) == []
        assert (await ledger.load(redis, [held.id]))[0].state == "netted"
        assert await ledger.grants_in(redis, "pending", M) == []

    async def test_total_change_during_hold_keeps_the_hold(self, redis: Redis) -> None:
        [held] = await apply(redis, grant_outcome(15, hold_s=86400))
        [replacement] = await apply(redis, grant_outcome(12, hold_s=86400))
        assert replacement.due_ms == held.due_ms and replacement.points == 12

    async def test_daily_cap_limits_a_customer_across_orders(self, redis: Redis) -> None:
        capped = {"cap_per_customer_per_day": 20, "day": "2026-03-05"}
        first = await apply(redis, grant_outcome(15, **capped))
        second = await apply(redis, grant_outcome(15, scope="order:2", **capped))
        third = await apply(redis, grant_outcome(15, scope="order:3", **capped))
        assert [g.points for g in first + second + third] == [15, 5]

    async def test_once_per_customer_bonus_is_revoked_with_its_order(self, redis: Redis) -> None:
        bonus = grant_outcome(100, rule="first_order", scope="customer:42")
        await send_all(redis, await apply(redis, grant_outcome(15), bonus))
        back = await apply(redis, no_match(), revoke_all=True)
        assert sorted((g.rule, g.type, g.points) for g in back) == [
            ("first_order", "minus", 100),
            ("purchase", "minus", 15),
        ]

    async def test_points_above_salla_maximum_are_split(self, redis: Redis) -> None:
        grants = await apply(redis, grant_outcome(2_100_000))
        assert [g.points for g in grants] == [999_999, 999_999, 100_002]

    async def test_concurrent_workers_on_one_order_cannot_both_add(self, redis: Redis) -> None:
        results = await asyncio.gather(*(apply(redis, grant_outcome(15)) for _ in range(20)))
        assert sum(g.signed_points for grants in results for g in grants) == 15

    async def test_concurrent_orders_cannot_overrun_a_daily_cap(self, redis: Redis) -> None:
        """Each order's entry is its own, so only the cap's check keeps them within it."""
        capped = {"cap_per_customer_per_day": 40, "day": "2026-03-05"}
        results = await asyncio.gather(
            *(apply(redis, grant_outcome(15, scope=f"order:{n}", **capped)) for n in range(20))
        )
        assert sum(g.signed_points for grants in results for g in grants) == 40


class TestCommit:
    """The ledger's one-round-trip commit writes only if what it was computed from is unchanged."""

    async def test_writes_when_every_checked_value_is_as_read(self, redis: Redis) -> None:
        await redis.hset("h", "state", "pending")
        writes = Writes()
        writes.check("h", "state", "pending")
        writes.check("missing", "", None)  # a missing key reads as ""
        writes.hset("out", mapping={"a": 1, "b": "x y"})
        writes.zadd("z", {"g1": 5})
        assert await commit(redis, writes)
        assert await redis.hgetall("out") == {"a": "1", "b": "x y"}
        assert await redis.zscore("z", "g1") == 5

    async def test_writes_nothing_when_a_checked_value_changed(self, redis: Redis) -> None:
        await redis.hset("h", "state", "pending")
        await redis.set("cap", "15")
        for key, field, seen in (("h", "state", "pending"), ("cap", "", "15")):
            writes = Writes()
            writes.check(key, field, seen)
            writes.sadd("out", "written")
            await redis.hset("h", "state", "claimed")  # a flush claimed the grant meanwhile
            await redis.incrby("cap", 10)  # another order used the cap meanwhile
            assert not await commit(redis, writes)
        assert await redis.exists("out") == 0

    async def test_a_server_that_lost_the_script_gets_it_again(self, redis: Redis) -> None:
        """The commit is sent by its SHA1; a restarted or promoted server has no scripts."""
        await redis.script_flush()
        writes = Writes()
        writes.sadd("out", "written")
        assert await commit(redis, writes)
        assert await redis.smembers("out") == {"written"}  # type: ignore[misc]


class TestGrantStates:
    """pending → claimed → sending → sent, with recovery of dead workers' claims."""

    async def test_claim_is_exclusive(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        first, second = await asyncio.gather(
            ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="a"),
            ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="b"),
        )
        assert sorted([len(first.grants), len(second.grants)]) == [0, 1]

    async def test_sweep_returns_claimed_and_sends_sending_to_unknown(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        await ledger.apply_outcomes(redis, M, [grant_outcome(7, scope="order:2")], customer=43)
        claimed = (
            await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=-1, token="t")
        ).grants
        sending = [g for g in claimed if g.customer == 43]
        await ledger.mark_sending(
            redis, M, sending, "b1", token="t", call_timeout_ms=-1
        )  # then it died
        returned, unknown = await ledger.sweep_claims(redis, M)
        assert (returned, unknown) == (1, 1)
        assert [g.customer for g in await ledger.grants_in(redis, "pending", M)] == [42]
        [lost] = await ledger.grants_in(redis, "unknown", M)
        assert (lost.customer, lost.state) == (43, "unknown")

    async def test_a_stalled_flush_cannot_send_what_another_worker_took_over(
        self, redis: Redis
    ) -> None:
        await apply(redis, grant_outcome(15))
        [stalled] = (
            await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=-1, token="A")
        ).grants
        assert await ledger.sweep_claims(redis, M) == (1, 0)  # A's claim expired
        [taken] = (
            await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="B")
        ).grants
        assert await ledger.mark_sending(redis, M, [stalled], "b-a", token="A") == []
        assert [g.id for g in await ledger.mark_sending(redis, M, [taken], "b-b", token="B")] == [
            taken.id
        ]

    async def test_grants_whose_call_was_not_made_go_back_only_if_still_sending_in_the_batch(
        self, redis: Redis
    ) -> None:
        """A flush that got no replica's confirmation of `sending` makes no call and returns
        its grants to pending; not those this master no longer says it is sending (after a
        failover: still claimed, or taken over), which the sweep recovers."""
        await apply(redis, grant_outcome(15))
        [grant] = (
            await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="A")
        ).grants
        later = ledger.now_ms() + 5_000
        assert not await ledger.release_unsent(redis, M, [grant], "b1", later, "no replica")
        await ledger.mark_sending(redis, M, [grant], "b1", token="A")
        assert not await ledger.release_unsent(redis, M, [grant], "b2", later, "no replica")
        assert (await ledger.load(redis, [grant.id]))[0].state == "sending"
        assert await ledger.release_unsent(redis, M, [grant], "b1", later, "no replica")
        [back] = await ledger.load(redis, [grant.id])
        assert (back.state, back.due_ms, back.error) == ("pending", later, "no replica")
        assert await ledger.due_count(redis, M, later) == 1
        assert await redis.zcard(keys.grant_set("claimed", M)) == 0

    async def test_settled_grants_expire_but_the_ledger_entry_stays(self, redis: Redis) -> None:
        [sent] = await apply(redis, grant_outcome(15))
        await send_all(redis, [sent])
        [replaced] = await apply(redis, grant_outcome(20))
        await apply(redis, grant_outcome(10))  # nets `replaced` (+5, unsent), then minus 5
        assert 0 < await redis.ttl(keys.grant(sent.id)) <= ledger.SETTLED_GRANT_TTL_S
        assert (await ledger.load(redis, [replaced.id]))[0].state == "netted"
        assert await redis.ttl(keys.grant(replaced.id)) > 0
        assert await redis.ttl(keys.entry(M, "order:1")) == -1  # kept for good

    async def test_heartbeat_keeps_a_live_claim(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        claimed = (
            await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=-1, token="A")
        ).grants
        await ledger.extend_claims(redis, M, claimed, 60_000)
        assert await ledger.sweep_claims(redis, M) == (0, 0)

    async def test_parked_grants_come_back_on_unpark(self, redis: Redis) -> None:
        await apply(redis, grant_outcome(15))
        claimed = (
            await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="t")
        ).grants
        await ledger.park(redis, M, claimed, "no token")
        assert await ledger.due_count(redis, M) == 0
        assert await ledger.unpark(redis, M) == 1
        assert await ledger.due_count(redis, M) == 1
