"""The key schema (service/keys.py) on a real Redis: every key a store's life writes carries the
store's hash tag, the cross-store keys are the listed few, and the sweep forgets a store only
after finding it idle twice."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from service import keys, ledger, process_state
from tests.support.outcomes import grant_outcome

M, OTHER = 555, 556
CROSS_STORE = {
    index(shard)
    for index in (
        keys.stores_pending,
        keys.stores_unknown,
        keys.stores_attention,
        keys.token_expiry,
        keys.orders_reconcile_due,
        keys.stores_compact,
        keys.grant_log,
    )
    for shard in keys.index_shards()
}


async def _life_of_two_stores(redis: Redis) -> None:
    """Grants made, netted, claimed, sent, failed, parked, unparked, swept, in two stores."""
    for merchant in (M, OTHER):
        made = await ledger.apply_outcomes(
            redis, merchant, [grant_outcome(15, cap_per_customer_per_day=100)], customer=42,
            order_id=1,
        )  # fmt: skip
        await ledger.apply_outcomes(
            redis, merchant, [grant_outcome(15, scope="customer:42", rule="first")], customer=42,
            order_id=1,
        )  # fmt: skip
        claim = await ledger.claim_due(
            redis, merchant, limit=10, claim_timeout_ms=60_000, token="t"
        )
        sending = await ledger.mark_sending(redis, merchant, claim.grants[:1], "b", token="t")
        await ledger.finish(redis, merchant, sending, "sent")
        await ledger.park(redis, merchant, claim.grants[1:], "no token")
        await ledger.unpark(redis, merchant)
        await ledger.apply_outcomes(redis, merchant, [], customer=42, order_id=1, revoke_order=True)
        await ledger.sweep_claims(redis, merchant)
        await ledger.forget_store_if_idle(redis, merchant)
        assert made, "the life made grants"


class TestSchema:
    async def test_every_key_of_a_store_carries_its_tag(self, redis: Redis) -> None:
        await _life_of_two_stores(redis)
        written = [key async for key in redis.scan_iter("sr:*")]
        assert len(written) > 10
        for key in written:
            if key in CROSS_STORE:
                continue
            assert keys.store_of(key) in (M, OTHER), f"{key} has no store's hash tag"
        stores = {keys.store_of(k) for k in written} - {None}
        assert stores == {M, OTHER}

    async def test_grant_ids_name_their_store(self, redis: Redis) -> None:
        [grant] = await ledger.apply_outcomes(
            redis, M, [grant_outcome(15)], customer=42, order_id=1
        )
        assert keys.grant_store(grant.id) == M
        assert keys.grant(grant.id) == f"sr:{{m:{M}}}:grant:{grant.id}"
        [loaded] = await ledger.load(redis, [grant.id, "not-a-grant", "x"])
        assert loaded.id == grant.id

    @pytest.mark.parametrize("text", ["", "abc", "-1", "12", "12-", "١٢-abc", "1 2-x"])
    def test_what_is_not_a_grant_id(self, text: str) -> None:
        assert keys.grant_store(text) is None
        with pytest.raises(ValueError, match="not a grant id"):
            keys.grant(text)

    def test_a_grant_set_name_from_the_outside_is_checked(self) -> None:
        assert keys.as_grant_set("failed") == "failed"
        with pytest.raises(ValueError, match="one of"):
            keys.as_grant_set("pending:*")

    def test_store_and_inbox_tags_differ(self) -> None:
        assert keys.store_of(keys.entry(7, "order:1")) == 7
        assert keys.store_of(keys.WEBHOOK_STREAM) is None
        assert keys.WEBHOOK_STREAM.startswith("sr:{inbox}:")
        assert keys.seen("7:order.created:ab").startswith("sr:{inbox}:")


class TestCrossStoreSets:
    async def test_a_store_is_listed_before_its_grants_and_forgotten_after_two_idle_looks(
        self, redis: Redis
    ) -> None:
        await ledger.apply_outcomes(redis, M, [grant_outcome(15)], customer=42, order_id=1)
        assert await ledger.stores_with_work(redis) == [M]
        claim = await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="t")
        await ledger.finish(redis, M, claim.grants, "sent")
        later = ledger.now_ms() + 120_000  # past the guard of a recent listing (below)
        await ledger.forget_store_if_idle(redis, M, at_ms=later)
        assert await ledger.stores_with_work(redis) == [M], "one idle look is not enough"
        await ledger.forget_store_if_idle(redis, M, at_ms=later)
        assert await ledger.stores_with_work(redis) == []

    async def test_a_store_is_listed_once_per_few_seconds_and_not_forgotten_meanwhile(
        self, redis: Redis
    ) -> None:
        """A worker lists a busy store once per `LISTING_FRESH_S`, not once per event; the
        sweep forgets no store listed within that time and a margin, so a worker relying on
        its listing never finds it undone."""

        await ledger.apply_outcomes(redis, M, [grant_outcome(15)], customer=42, order_id=1)
        assert await ledger.stores_with_work(redis) == [M]
        await redis.srem(keys.stores_pending(keys.index_shard(M)), str(M))  # type: ignore[misc]
        for order in range(2, 6):
            made = await ledger.apply_outcomes(
                redis, M, [grant_outcome(15, scope=f"order:{order}")], customer=42, order_id=order
            )
            assert made, "each order makes a grant"
        assert await ledger.stores_with_work(redis) == [], "listed again within seconds"
        process_state.listed_stores[M] -= ledger.LISTING_FRESH_S  # that listing is now old
        await ledger.apply_outcomes(
            redis, M, [grant_outcome(15, scope="order:6")], customer=42, order_id=6
        )
        assert await ledger.stores_with_work(redis) == [M]
        claim = await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="t")
        await ledger.finish(redis, M, claim.grants, "sent")
        listed = ledger.now_ms()
        guard_ms = int((ledger.LISTING_FRESH_S + ledger.LISTING_MARGIN_S) * 1000)
        for at in (listed + 1_000, listed + guard_ms - 1_000):  # idle twice, but listed lately
            await ledger.forget_store_if_idle(redis, M, at_ms=at)
        assert await ledger.stores_with_work(redis) == [M]
        await ledger.forget_store_if_idle(redis, M, at_ms=listed + guard_ms + 1_000)
        assert await ledger.stores_with_work(redis) == []

    async def test_work_between_two_looks_keeps_the_store(self, redis: Redis) -> None:
        await ledger.note_pending_work(redis, M)
        await ledger.forget_store_if_idle(redis, M)  # idle: marked
        await ledger.apply_outcomes(redis, M, [grant_outcome(15)], customer=42, order_id=1)
        await ledger.forget_store_if_idle(redis, M)  # not idle: the mark goes
        await ledger.forget_store_if_idle(redis, M)  # still not idle
        assert await ledger.stores_with_work(redis) == [M]

    async def test_the_sweep_trims_the_grant_log(self, redis: Redis) -> None:
        old = ledger.now_ms() - ledger.SETTLED_GRANT_TTL_S * 1000 - 1
        log = keys.grant_log(keys.index_shard(M))
        await redis.zadd(log, {f"{M}-old": old, f"{M}-new": ledger.now_ms()})
        assert await ledger.trim_grant_log(redis) == 1
        assert await redis.zrange(log, 0, -1) == [f"{M}-new"]

    async def test_every_new_grant_is_in_the_log(self, redis: Redis) -> None:
        made = await ledger.apply_outcomes(redis, M, [grant_outcome(15)], customer=42, order_id=1)
        log = keys.grant_log(keys.index_shard(M))
        assert set(await redis.zrange(log, 0, -1)) == {g.id for g in made}

    async def test_stores_are_listed_in_their_own_shard_and_read_from_every_shard(
        self, redis: Redis
    ) -> None:
        """M and OTHER fall in neighbouring shards; each shard's set lists only its own
        stores, and the readers see both."""
        assert keys.index_shard(M) != keys.index_shard(OTHER)
        for merchant in (M, OTHER):
            await ledger.apply_outcomes(
                redis, merchant, [grant_outcome(15)], customer=42, order_id=1
            )
        for merchant in (M, OTHER):
            listing = keys.stores_pending(keys.index_shard(merchant))
            assert await redis.smembers(listing) == {str(merchant)}  # type: ignore[misc]
            assert listing.startswith(f"sr:{{x:{keys.index_shard(merchant)}.")
        assert await ledger.stores_with_work(redis) == [M, OTHER]
        assert await ledger.stores_with(redis, "pending") == [M, OTHER]
        claim = await ledger.claim_due(redis, M, limit=10, claim_timeout_ms=60_000, token="t")
        await ledger.finish(redis, M, claim.grants, "failed", "422")
        assert await ledger.stores_with(redis, "failed") == [M]
        assert await ledger.stores_with(redis, "pending") == [OTHER], "M's set is empty"


class TestInboxShardTags:
    """`INBOX_SHARDS` streams land evenly on the masters of an evenly split cluster (what
    `--cluster create` makes): `{inbox:1}`, `{inbox:2}` had all hashed to one master of three."""

    @pytest.mark.parametrize("shards", [3, 6, 9, 12])
    @pytest.mark.parametrize("masters", [3, 6])
    def test_shards_spread_evenly(self, shards: int, masters: int) -> None:
        from redis.crc import key_slot

        per_master = [0] * masters
        for n in range(shards):
            slot = key_slot(keys.webhook_stream(n, shards).encode())
            assert slot == key_slot(keys.seen("d", n, shards).encode())  # one slot per shard
            per_master[slot * masters // 16384] += 1
        expected = shards / masters
        assert all(abs(count - expected) < 1 for count in per_master), per_master

    def test_shard_zero_is_the_single_inbox_and_tags_are_distinct(self) -> None:
        assert keys.webhook_stream(0, 8) == keys.WEBHOOK_STREAM
        assert keys.seen("d", 0, 8) == keys.seen("d")
        assert len(set(keys.webhook_streams(16))) == 16
