"""Bounded memory on a real Redis: a settled order is compacted to what a later event reads,
and retired to a tombstone after LEDGER_RETENTION_DAYS. Every order goes through the real
processing path (rules, order-state core, ledger); its grants walk the ledger's real
transitions (claim → sending → sent). Time passing is the only shortcut: compaction and
retirement are given their `now`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from service import keys, ledger, queue
from service.ledger import apply, compact
from service.ledger.event_key import EventKey
from service.ledger.facts import OrderFacts
from service.ledger.order_state import RuleRecord, Verdict
from service.ledger.packed import NotPackable, pack, unpack
from service.logging import captured
from service.processing import ProcessingDeps, apply_rules
from service.rules import parse_rules_text
from service.webhooks import event_time, parse_envelope
from tests.conftest import make_settings
from tests.support.order_bodies import order_body

M = 7_100_001
CUSTOMER = 900_017
DAY_MS = 86_400_000
# duplicates: rule files as test data, like test_order_truth's and benchmarks/orders.py's; each
# file reads alone.
RULES = """
version: 1
rules:
  - id: purchase
    on: [order.created, order.updated, order.status.updated]
    when: order.completed_once
    points: order.total / 10
    type: plus
    reason: "نقاط الطلب رقم {order.reference_id}"
    channels: [sms]
  - id: first_order
    on: [order.status.updated]
    when: order.completed_once
    once_per: customer
    points: 50
    type: plus
    reason: "first order bonus"
"""
# duplicates: the held purchase rule of benchmarks/orders.py (test data).
HELD = """
version: 1
rules:
  - id: purchase
    on: [order.status.updated]
    when: order.completed_once
    points: order.total / 10
    type: plus
    reason: "order {order.reference_id}"
    hold_days: 14
"""


def body(event: str, order_id: int, status: str, total: int, at: int, history: int = 0) -> bytes:
    return order_body(event, M, order_id, status, total, at, customer=CUSTOMER, history=history)


class Store:
    """One store's events through the real processing path."""

    def __init__(self, deps: ProcessingDeps) -> None:
        self.deps = deps
        self.arrival = 0

    async def event(self, raw: bytes) -> dict[str, Any]:
        self.arrival += 1
        env = parse_envelope(raw)
        at = int(event_time(env.created_at) or 0) * 1000 + self.arrival  # as an inbox id would
        return await apply_rules(self.deps, env, f"d{self.arrival}", "t", arrival=(at, 0))

    async def complete(self, order_id: int, total: int, at: int) -> None:
        await self.event(body("order.created", order_id, "under_review", total, at))
        await self.event(body("order.status.updated", order_id, "completed", total, at + 1, 11))

    async def send_all(self) -> list[ledger.Grant]:
        """Every due grant walked through claim → sending → sent, as a flush does."""
        redis = self.deps.redis
        claim = await ledger.claim_due(redis, M, limit=1000, claim_timeout_ms=60_000, token="t")
        await ledger.mark_sending(redis, M, claim.grants, "batch", token="t")
        await ledger.finish(redis, M, claim.grants, "sent")
        return claim.grants

    async def compact(self, now_ms: int) -> compact.Pass:
        return await compact.compact_store(self.deps.redis, M, now_ms, 400)


@pytest.fixture
async def store(redis: Redis, redis_url: str) -> AsyncIterator[Store]:
    pool = await queue.connect(redis_url)
    deps = ProcessingDeps(make_settings(), redis, pool, parse_rules_text(RULES))
    yield Store(deps)
    await pool.aclose()


async def order_bytes(redis: Redis, order_id: int) -> int:
    """MEMORY USAGE over every key of the order (its entry and its index)."""
    total = 0
    for key in (
        keys.entry(M, f"order:{order_id}"),
        keys.order_index(M, order_id),
        keys.compacted(M, order_id),
    ):
        total += await redis.memory_usage(key) or 0
    return total


def signed(grants: list[ledger.Grant]) -> list[tuple[str, int, int, str]]:
    return sorted((g.rule, g.customer, g.signed_points, g.reason) for g in grants)


NOW = int(time.time())
T0 = NOW - 90 * 86400  # when the orders happened
LATER = NOW + 30 * 86400  # past every window, and past the compaction queue's first look


class TestCompaction:
    """A settled order keeps, in at most 200 bytes, exactly what a later event reads."""

    async def test_a_settled_order_is_compacted_to_at_most_200_bytes(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4001, 154, T0)
        await store.send_all()
        full = await order_bytes(redis, 4001)
        done = await store.compact(LATER * 1000)
        assert done.compacted == 1
        assert await order_bytes(redis, 4001) <= 200 < full
        assert not await redis.exists(keys.entry(M, "order:4001"))
        assert not await redis.exists(keys.order_index(M, 4001))  # folded into the entry
        assert await ledger.entry(redis, M, "order:4001") == {"purchase": 15}

    async def test_a_late_cancel_of_a_compacted_order_takes_back_exactly_its_points(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4002, 154, T0)
        sent = await store.send_all()
        assert (await store.compact(LATER * 1000)).compacted == 1
        await store.event(body("order.status.updated", 4002, "canceled", 154, LATER, 12))
        reversals = await ledger.grants_in(redis, "pending", M)
        # The purchase points and the customer's first-order bonus (another scope, reached
        # through the index the compacted entry folded in), with the reasons they were given.
        assert signed(reversals) == sorted(
            (g.rule, g.customer, -g.signed_points, "Reversal: " + g.reason) for g in sent
        )
        assert {g.rule for g in sent} == {"purchase", "first_order"}
        assert await ledger.entry(redis, M, "order:4002") == {"purchase": 0}
        assert not await redis.exists(keys.compacted(M, 4002))  # written in full again

    async def test_a_resent_old_webhook_of_a_compacted_order_pays_nothing(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4003, 154, T0)
        await store.send_all()
        await store.compact(LATER * 1000)
        result = await store.event(body("order.status.updated", 4003, "completed", 154, T0 + 1, 11))
        assert result["outcome"] == "no_change"
        assert await ledger.grants_in(redis, "pending", M) == []
        assert await ledger.entry(redis, M, "order:4003") == {"purchase": 15}
        assert await ledger.entry(redis, M, f"customer:{CUSTOMER}") == {"first_order": 50}

    async def test_a_total_edit_after_compaction_grants_the_difference_and_is_compacted_again(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4004, 154, T0)
        await store.send_all()
        await store.compact(LATER * 1000)
        await store.event(body("order.updated", 4004, "completed", 254, LATER))
        [more] = await ledger.grants_in(redis, "pending", M)
        assert (more.rule, more.signed_points) == ("purchase", 10)
        await store.send_all()
        assert (await store.compact((LATER + 30 * 86400) * 1000)).compacted == 1
        assert await ledger.entry(redis, M, "order:4004") == {"purchase": 25}
        await store.event(body("order.status.updated", 4004, "canceled", 254, LATER + 40 * 86400))
        back = await ledger.grants_in(redis, "pending", M)
        assert sorted(g.signed_points for g in back) == [-50, -25]

    async def test_an_order_with_a_grant_on_its_way_is_not_compacted(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4005, 154, T0)
        before = await redis.hgetall(keys.entry(M, "order:4005"))
        assert (await store.compact(LATER * 1000)).compacted == 0  # unsent grants
        assert await redis.hgetall(keys.entry(M, "order:4005")) == before
        await store.send_all()
        assert (await store.compact(LATER * 1000)).compacted == 0  # looked at again a day later
        assert (await store.compact(LATER * 1000 + DAY_MS)).compacted == 1

    async def test_a_held_order_is_not_compacted_within_its_return_window(
        self, redis: Redis, redis_url: str
    ) -> None:
        pool = await queue.connect(redis_url)
        try:
            held = Store(ProcessingDeps(make_settings(), redis, pool, parse_rules_text(HELD)))
            at = NOW
            await held.event(body("order.status.updated", 4006, "completed", 300, at, 3))
            pending = keys.grant_set("pending", M)
            await redis.zadd(pending, dict.fromkeys(await redis.zrange(pending, 0, -1), 0))
            await held.send_all()
            # 14 days of hold + 14 days: not at 20 days, yes at 29.
            assert (await held.compact((at + 20 * 86400) * 1000)).compacted == 0
            assert (await held.compact((at + 29 * 86400) * 1000 + DAY_MS)).compacted == 1
        finally:
            await pool.aclose()

    async def test_an_event_that_read_before_compaction_reads_again(
        self, store: Store, redis: Redis
    ) -> None:
        """The compaction bumps the entry's version: a commit decided on the full entry fails
        its check, and the next round reads the compacted one (same outcome)."""
        await store.complete(4007, 154, T0)
        await store.send_all()
        stale = await apply.read_order(redis, M, 4007)
        await store.compact(LATER * 1000)
        fresh = await apply.read_order(redis, M, 4007)
        assert fresh.stored.compact and fresh.facts == stale.facts
        assert fresh.version != stale.version
        assert {k: v for k, v in fresh.raw.items() if k[:2] != "r:"} == {
            **{k: v for k, v in stale.raw.items() if k[:2] != "r:"},
            "v": fresh.raw["v"],
        }

    async def test_packing_keeps_what_a_reversal_reads(self, store: Store, redis: Redis) -> None:
        await store.complete(4008, 154, T0)
        await store.send_all()
        before = await apply.read_order(redis, M, 4008)
        await store.compact(LATER * 1000)
        after = await apply.read_order(redis, M, 4008)
        rule_before = RuleRecord.decode(before.raw["r:purchase"])
        rule_after = RuleRecord.decode(after.raw["r:purchase"])
        assert (rule_after.granted, rule_after.deserved) == (
            rule_before.granted,
            rule_before.deserved,
        )
        assert (rule_after.reason, rule_after.channels, rule_after.version) == (
            rule_before.reason,
            rule_before.channels,
            rule_before.version,
        )
        [(order, verdict)] = rule_after.verdicts.items()
        standing = rule_before.verdicts[order]
        assert (verdict.key, verdict.points, verdict.customer) == (
            standing.key,
            standing.points,
            standing.customer,
        )
        assert after.stored.linked == (f"customer:{CUSTOMER}",)


class TestRetirement:
    """After LEDGER_RETENTION_DAYS a compacted order is a tombstone that refuses re-sends."""

    async def test_a_retired_order_refuses_a_resent_completion_and_says_so(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4101, 154, T0)
        await store.send_all()
        await store.compact(LATER * 1000)
        assert await compact.retire_due(redis, M, (LATER + 300 * 86400) * 1000, 400) == 0
        retired = await compact.retire_due(redis, M, (LATER + 420 * 86400) * 1000, 400)
        assert retired == 1
        assert not await redis.exists(keys.compacted(M, 4101))
        assert await redis.memory_usage(keys.tombstones(M, 4101)) < 100
        with captured() as lines:
            result = await store.event(
                body("order.status.updated", 4101, "completed", 154, LATER + 421 * 86400, 11)
            )
        assert result["outcome"] == "order_retired"
        assert await ledger.grants_in(redis, "pending", M) == []
        [line] = [x for x in lines if x["event"] == "order_retired"]
        assert line["order_id"] == 4101 and line["log_level"] == "warning"

    async def test_an_order_written_again_after_compaction_is_not_retired(
        self, store: Store, redis: Redis
    ) -> None:
        await store.complete(4102, 154, T0)
        await store.send_all()
        await store.compact(LATER * 1000)
        await store.event(body("order.updated", 4102, "completed", 254, LATER + 86400))
        assert await compact.retire_due(redis, M, (LATER + 420 * 86400) * 1000, 400) == 0
        assert await ledger.entry(redis, M, "order:4102") == {"purchase": 25}


class TestSweep:
    """The sweep visits stores whose compaction is due, a few per cycle."""

    async def test_due_stores_are_visited_and_rescheduled(self, store: Store, redis: Redis) -> None:
        await store.complete(4201, 154, T0)
        await store.send_all()
        assert await redis.zscore(keys.stores_compact(keys.index_shard(M)), str(M)) is not None
        later = (LATER + 30 * 86400) * 1000
        done = await compact.compact_due_stores(redis, later, 400)
        assert (done.stores, done.compacted) == (1, 1)
        assert (
            await redis.zscore(keys.stores_compact(keys.index_shard(M)), str(M)) > later
        )  # next due tomorrow
        assert (await compact.compact_due_stores(redis, later, 400)).stores == 0


class TestPacking:
    """The packed form reads back as the full entry it stands for (pure)."""

    def test_an_unusual_entry_reads_back_exactly(self) -> None:
        order = 2_116_149_737
        done = EventKey(1, 1_790_000_000, 81_234_567, (1_790_000_000_412, 3))
        fetched = EventKey(2, 1_790_086_400, None, (1_790_086_400_000, 0), True)
        cancel = EventKey(1, None, None, (1_790_000_900_000, 1))
        facts = OrderFacts(
            newest=fetched,
            revoked=cancel,
            rules={"purchase": (done, f"order:{order}"), "first": (done, "customer:55")},
            completed=True,
            status="custom_status",
            total="154.50",
            customer=55,
            gone=True,
        )
        record = RuleRecord(
            verdicts={order: Verdict(done, order, 77, -40, reason="x", hold_s=86400)},
            granted={55: 15, 77: -40},
            deserved={55: 0, 77: -40},
            reason="نقاط الطلب رقم 0042 و 7",
            channels=("sms", "email"),
            version="v9",
        )
        fields = {"v": "12", "r:purchase": record.encoded(), **facts.to_fields()}
        value = pack(fields, order, ["customer:55", "campaign:ramadan"])
        back = unpack(value.value, order, value.texts)
        assert OrderFacts.from_fields(back.fields) == facts
        assert back.fields["v"] == "12"
        again = RuleRecord.decode(back.fields["r:purchase"])
        assert (again.granted, again.deserved) == ({55: 15, 77: -40}, {77: -40})
        assert (again.reason, again.channels, again.version) == (
            record.reason,
            record.channels,
            record.version,
        )
        [(_, verdict)] = again.verdicts.items()
        assert (verdict.key, verdict.customer, verdict.points) == (done, 77, -40)
        assert back.linked == ("campaign:ramadan", "customer:55")

    def test_free_text_with_a_separator_is_left_full(self) -> None:
        facts = OrderFacts(newest=EventKey(1, 1, None, (1000, 0)), status="a|b")
        with pytest.raises(NotPackable):
            pack({"v": "1", **facts.to_fields()}, 5, [])
