"""The sweep's share of the stores (service/sweeper.py): a bounded number of stores a cycle, in
rotation over the index shards, every store reached within a bounded number of cycles, and
gauges that still count every store."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from service import keys, ledger, metrics, queue, sweeper
from service.delivery.deps import Deps
from service.salla import SallaClient
from tests.conftest import eventually, make_settings
from tests.support.outcomes import grant_outcome

#: Store ids whose index shard is their offset: FIRST + n lives in shard n mod 16.
FIRST = 16_000


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def make_deps(redis: Redis, redis_url: str) -> AsyncIterator[Any]:
    """Delivery's dependencies with a sweep budget of the test's choosing (no Salla call is
    made: the sweep only queues jobs)."""
    pool = await queue.connect(redis_url)
    async with httpx.AsyncClient() as http:

        def make(**overrides: Any) -> Deps:
            settings = make_settings(**overrides)
            return Deps(settings, redis, pool, SallaClient(http, settings.salla_api_base))

        yield make
    await pool.aclose()


async def due_grant(redis: Redis, merchant: int) -> None:
    """A due grant whose flush job was lost: in the ledger and listed, nothing on the queue."""
    [made] = await ledger.apply_outcomes(redis, merchant, [grant_outcome(10)], customer=42)
    assert made.state == "pending"


async def flushes_queued(redis: Redis) -> set[int]:
    jobs: list[str] = await redis.zrange("arq:queue", 0, -1)
    return {int(job.split(":")[1]) for job in jobs if job.startswith(f"{queue.FLUSH}:")}


class TestRotation:
    """A small budget: each cycle visits a few stores, and the rotation reaches them all."""

    async def test_a_lost_flush_is_queued_within_the_rotation_not_at_once(
        self, redis: Redis, make_deps: Any
    ) -> None:
        stores = [FIRST + n for n in range(32)]  # two stores in each of the 16 shards
        for merchant in stores:
            await due_grant(redis, merchant)
        deps = make_deps(sweep_stores_per_cycle=3)
        last = FIRST + 31  # in shard 15, the rotation's last
        first = await sweeper.visit_stores(deps)
        # Shard 0's two stores, then the first of shard 1: the shard is split between cycles.
        assert (first.stores, first.flushes) == (3, 3)
        assert await flushes_queued(redis) == {FIRST, FIRST + 16, FIRST + 1}
        cycles = 1
        while last not in await flushes_queued(redis):
            report = await sweeper.visit_stores(deps)
            assert report.stores <= 3
            cycles += 1
            assert cycles <= 20, "the rotation never reached the last shard"
        assert cycles == math.ceil(len(stores) / 3)
        assert await flushes_queued(redis) == set(stores)
        # The rotation goes on round the shards: the last cycle took shard 15's two stores and
        # shard 0's first, the next takes up from there (and queues their flushes again, the
        # queue having lost them, as in a failover).
        await redis.delete("arq:queue")
        await sweeper.visit_stores(deps)
        assert await flushes_queued(redis) == {FIRST + 16, FIRST + 1, FIRST + 17}

    async def test_stores_with_unknown_outcomes_take_their_turn(
        self, redis: Redis, make_deps: Any
    ) -> None:
        """`stores:unknown` is visited in the same rotation (a Salla outage can fill it)."""
        stores = [FIRST + n for n in range(16)]
        for merchant in stores:
            await redis.zadd(keys.grant_set("unknown", merchant), {f"{merchant}-ab": 1})
            await redis.sadd(keys.stores_unknown(keys.index_shard(merchant)), str(merchant))
        deps = make_deps(sweep_stores_per_cycle=4)
        report = await sweeper.visit_stores(deps)
        assert (report.stores, report.reconciles) == (4, 4)
        jobs: list[str] = await redis.zrange("arq:queue", 0, -1)
        assert {int(j.split(":")[1]) for j in jobs if j.startswith("reconcile:")} == set(stores[:4])

    async def test_an_unreadable_cursor_starts_the_rotation_over(
        self, redis: Redis, make_deps: Any
    ) -> None:
        for merchant in (FIRST, FIRST + 5):
            await due_grant(redis, merchant)
        await redis.hset(keys.SWEEP_CURSOR, mapping={"shard": "99", "after": "x", "pending": "?"})
        report = await sweeper.visit_stores(make_deps(sweep_stores_per_cycle=1))
        assert report.stores == 1
        assert await flushes_queued(redis) == {FIRST}
        assert await redis.hget(keys.SWEEP_CURSOR, "shard") == "1"


class TestGauges:
    """The metrics count every shard's stores, whichever shards this cycle visited."""

    async def test_a_store_not_visited_this_cycle_still_counts(
        self, redis: Redis, make_deps: Any
    ) -> None:
        for n in range(16):  # one store in each shard, one grant each
            await due_grant(redis, FIRST + n)
        parked = FIRST + 9
        claim = await ledger.claim_due(redis, parked, limit=10, claim_timeout_ms=60_000, token="t")
        await ledger.park(redis, parked, claim.grants, "no token")
        deps = make_deps(sweep_stores_per_cycle=1)
        for _ in range(16):  # one full rotation: every shard counted once
            await sweeper.visit_stores(deps)
        assert sample("salla_rewards_pending_grants") == 15
        assert sample("salla_rewards_grants_needing_attention", kind="parked") == 1
        report = await sweeper.visit_stores(deps)  # shard 0 alone
        assert (report.stores, report.shards) == (1, 1)
        assert sample("salla_rewards_pending_grants") == 15
        assert sample("salla_rewards_grants_needing_attention", kind="parked") == 1
        assert sample("salla_rewards_oldest_pending_grant_age_seconds") > 0

    async def test_a_shard_split_between_cycles_is_counted_whole(
        self, redis: Redis, make_deps: Any
    ) -> None:
        for merchant in (FIRST, FIRST + 16, FIRST + 32):  # three stores in shard 0
            await due_grant(redis, merchant)
        deps = make_deps(sweep_stores_per_cycle=2)
        await sweeper.visit_stores(deps)  # two of them: shard 0 not counted yet
        assert sample("salla_rewards_pending_grants") == 0
        await sweeper.visit_stores(deps)  # the third: the shard's pass ends
        assert sample("salla_rewards_pending_grants") == 3
        counted = await redis.hgetall(keys.sweep_gauges(0))
        assert float(counted["pending"]) == 3 and int(counted["at"]) > 0

    async def test_a_store_gone_from_its_shard_stops_counting(
        self, redis: Redis, make_deps: Any
    ) -> None:
        await due_grant(redis, FIRST + 3)
        deps = make_deps()
        await sweeper.visit_stores(deps)
        assert sample("salla_rewards_pending_grants") == 1
        await redis.delete(keys.grant_set("pending", FIRST + 3))  # sent, say
        await sweeper.visit_stores(deps)
        assert sample("salla_rewards_pending_grants") == 0


class TestDefaultBudget:
    """With fewer stores than the budget, every cycle visits every store, as before."""

    async def test_one_cycle_visits_every_store(self, redis: Redis, make_deps: Any) -> None:
        stores = [FIRST + n * 7 for n in range(40)]  # across every shard
        for merchant in stores:
            await due_grant(redis, merchant)
        deps = make_deps()
        assert deps.settings.sweep_stores_per_cycle == 1000
        for _ in range(2):  # the second from where the first stopped: the same, all of them
            await redis.delete("arq:queue")
            report = await sweeper.visit_stores(deps)
            assert (report.stores, report.shards, report.flushes) == (40, 16, 40)
            assert await flushes_queued(redis) == set(stores)
        assert sample("salla_rewards_pending_grants") == 40


#: Sorted store ids per shard, as `read_listing` gives them (each id in its own shard).
listings = st.lists(st.integers(0, 400), unique=True, max_size=120).map(
    lambda ids: {s: sorted(i for i in ids if i % 16 == s) for s in keys.index_shards()}
)


class TestPlan:
    """The pure planner: at most the budget a cycle, no store twice in one, none left out."""

    @settings(max_examples=200, deadline=None)
    @given(listed=listings, budget=st.integers(1, 50), start=st.integers(0, 15))
    def test_every_store_within_the_rotation(
        self, listed: dict[int, list[int]], budget: int, start: int
    ) -> None:
        every = {m for stores in listed.values() for m in stores}
        window = math.ceil(len(every) / budget) + 1  # +1: starting mid-shard
        position = sweeper.Position(start)
        seen: list[set[int]] = []
        for _ in range(3 * window):
            segments, position = sweeper.plan(position, listed, budget)
            visited = [m for s in segments for m in s.stores]
            assert len(visited) <= budget
            assert len(set(visited)) == len(visited)
            assert all(keys.index_shard(m) == s.shard for s in segments for m in s.stores)
            seen.append(set(visited))
        for first in range(len(seen) - window + 1):
            assert set().union(*seen[first : first + window]) == every
        if len(every) <= budget:  # small: every cycle visits them all
            assert all(cycle == every for cycle in seen)


class TestLostOrderTruth:
    """An order asked about after same-second events that disagree: its `order_truth` job, lost
    with the queue, is queued again by the sweep (a minute on), the store is not forgotten
    meanwhile, and the job forgets the record however it ends."""

    async def test_the_sweep_asks_salla_again_for_an_order_the_queue_lost(
        self, redis: Redis, redis_url: str, make_deps: Any
    ) -> None:
        from service.orders import truth
        from service.processing import ProcessingDeps
        from service.rules.loader import parse_rules_text
        from tests.test_compaction import RULES, M, Store, body

        pool = await queue.connect(redis_url)
        try:
            store = Store(ProcessingDeps(make_settings(), redis, pool, parse_rules_text(RULES)))
            at = 1_790_000_000
            await store.event(body("order.created", 5001, "under_review", 100, at))
            # `order.updated` has no status-history id: the same second is a tie but arrival.
            await store.event(body("order.updated", 5001, "completed", 100, at + 1))
            said = await store.event(body("order.updated", 5001, "canceled", 100, at + 1))
            assert said.get("asked_salla"), said
            job = f"{queue.ORDER_TRUTH}:{M}:5001"
            assert await queue.job_known(pool, job)
            await pool.delete(f"arq:job:{job}")  # lost with the queue's master
            await pool.zrem("arq:queue", job)
            asked = keys.asked_salla(M)
            assert await redis.zscore(asked, "5001") is not None

            deps = make_deps()
            await sweeper.visit_stores(deps)
            assert not await queue.job_known(pool, job), "asked just now: its job may be running"
            a_minute_ago = ledger.now_ms() - ledger.asked.ASK_AGAIN_AFTER_MS - 1
            await redis.zadd(asked, {"5001": a_minute_ago})
            for _ in range(3):  # idle otherwise: the record keeps the store listed
                await ledger.forget_store_if_idle(redis, M, at_ms=ledger.now_ms() + 600_000)
            assert M in await ledger.stores_with_work(redis)
            await sweeper.visit_stores(deps)
            assert await queue.job_known(pool, job), "the sweep queued the lost job again"

            # The job, however it ends (here: the store has no token to ask with), forgets it.
            done = await truth.settle_order(truth.Deps(store.deps, deps), M, 5001)
            assert done["outcome"] == "unavailable"
            assert await redis.zscore(asked, "5001") is None
        finally:
            await pool.aclose()


class TestEveryWorkerReportsTheTotals:
    """The sweep runs on one worker at a time; every worker sets its gauges from Redis on its
    own clock, so a worker that has not swept lately reports the current totals, not what it
    saw when it last did."""

    async def test_a_worker_that_did_not_sweep_reports_the_current_totals(
        self, redis: Redis, make_deps: Any
    ) -> None:
        deps = make_deps()
        for n in range(3):
            await due_grant(redis, FIRST + n)
        await sweeper.visit_stores(deps)  # another worker's sweep
        metrics.PENDING.set(99)  # what this worker saw when it last swept
        metrics.INBOX_BACKLOG.labels("unread").set(99)
        await sweeper.publish_gauges(deps)
        assert sample("salla_rewards_pending_grants") == 3
        assert sample("salla_rewards_inbox_backlog", state="unread") == 0

    async def test_the_worker_keeps_them_fresh_on_its_own(
        self, redis: Redis, make_deps: Any
    ) -> None:
        deps = make_deps()
        await due_grant(redis, FIRST)
        await sweeper.visit_stores(deps)
        metrics.PENDING.set(99)
        task = asyncio.create_task(sweeper.keep_gauges_fresh(deps, every_s=0.05))
        try:
            await eventually(lambda: sample("salla_rewards_pending_grants") == 1)
        finally:
            task.cancel()
