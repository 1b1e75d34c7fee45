"""Periodic work that concerns every store costs the stores due, not every store: the token
refresh reads its stores from an expiry index, the orders reconciliation scheduler from a
schedule, both kept per index shard (service/tokens.py, service/orders/schedule.py). Counted
with the real server's own command statistics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import keys, queue, tokens
from service.delivery.deps import Deps
from service.orders import schedule
from service.salla import SallaClient, TokenSet
from tests.conftest import make_settings

DAY = 86400
EVERY = 3600


async def calls(redis: Redis, command: str) -> int:
    """How many times the server has run `command` (its INFO commandstats)."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def token(expires_in_s: int) -> TokenSet:
    expires = int(time.time()) + expires_in_s if expires_in_s else 0
    return TokenSet("access", "refresh", expires, "offline_access")


class TestTokenExpiryIndex:
    async def test_only_the_stores_due_are_read_soonest_first(self, redis: Redis) -> None:
        for merchant in range(1000, 1040):  # every shard, valid for 14 days
            await tokens.save(redis, merchant, token(14 * DAY))
        await tokens.save(redis, 2001, token(3 * 3600))
        await tokens.save(redis, 2002, token(3600))
        await tokens.save(redis, 2003, token(0))  # expiry unknown: never refreshed on a clock
        before = await calls(redis, "hgetall")
        due = await tokens.expiring(redis, 2 * DAY)
        assert [m for m, _ in due] == [2002, 2001]
        assert await calls(redis, "hgetall") - before == 2, "one record read per store due"
        assert [m for m, _ in await tokens.expiring(redis, 2 * DAY, limit=1)] == [2002]
        assert len(await tokens.authorized_stores(redis)) == 43

    async def test_new_tokens_leave_the_window_and_revoked_stores_leave_both_indexes(
        self, redis: Redis
    ) -> None:
        await tokens.save(redis, 2002, token(3600))
        await tokens.save(redis, 2002, token(14 * DAY))  # refreshed
        assert await tokens.expiring(redis, 2 * DAY) == []
        await tokens.save(redis, 2003, token(3600))
        await tokens.revoke(redis, 2003, "uninstalled")
        assert await tokens.expiring(redis, 2 * DAY) == []
        shard = keys.index_shard(2003)
        assert await redis.zscore(keys.token_expiry(shard), "2003") is None
        assert await redis.zscore(keys.orders_reconcile_due(shard), "2003") is None
        assert await tokens.authorized_stores(redis) == [2002]


@pytest.fixture
async def deps(redis: Redis, redis_url: str) -> AsyncIterator[Deps]:
    """Delivery's deps with no worker: a job queued stays on the queue until a test takes it."""
    pool = await queue.connect(redis_url)
    async with httpx.AsyncClient() as http:
        settings = make_settings(orders_reconcile_every_s=EVERY)
        yield Deps(settings, redis, pool, SallaClient(http, settings.salla_api_base))
    await pool.aclose()


async def take_job(pool: ArqRedis, job_id: str) -> None:
    """What a worker leaves of a job once it ran it (the service keeps no results): nothing."""
    await pool.delete(f"arq:job:{job_id}")
    await pool.zrem("arq:queue", job_id)


async def next_look(redis: Redis, merchant: int) -> float | None:
    return await redis.zscore(keys.orders_reconcile_due(keys.index_shard(merchant)), merchant)


class TestOrdersReconcileSchedule:
    async def test_a_run_looks_only_at_the_stores_due(self, deps: Deps, redis: Redis) -> None:
        for merchant in range(3000, 3200):
            await tokens.save(redis, merchant, token(14 * DAY))
        now = int(time.time())
        first = await schedule.start_due(deps, now)
        assert (first.looked, first.started) == (200, 200), "a new store runs at once"
        before = await calls(redis, "get")
        later = await schedule.start_due(deps, now + 60)
        assert (later.looked, later.started) == (0, 0)
        assert await calls(redis, "get") == before, "no store was read"
        looks = [await next_look(redis, m) for m in range(3000, 3200)]
        assert set(looks) == {now + schedule.CHECK_AFTER_S}, "each is checked on once"

    async def test_a_store_runs_once_a_period_and_again_once_if_the_queue_lost_it(
        self, deps: Deps, redis: Redis
    ) -> None:
        merchant = 3301
        await tokens.save(redis, merchant, token(14 * DAY))
        # Just after a period starts: the checks below fall in the same period.
        now = schedule.next_period_start(merchant, int(time.time()), EVERY) + 10
        slot = schedule.period(merchant, now, EVERY)
        job_id = queue.orders_reconcile_id(merchant, slot)
        assert (await schedule.start_due(deps, now)).started == 1
        assert await queue.job_known(deps.pool, job_id)

        # Still on the queue at the check: looked at, not queued twice, looked at again later.
        check = now + schedule.CHECK_AFTER_S
        assert (await schedule.start_due(deps, check)).started == 0
        assert await next_look(redis, merchant) == check + schedule.CHECK_AFTER_S

        # Lost with the queue before it finished: queued again, once.
        await take_job(deps.pool, job_id)
        check += schedule.CHECK_AFTER_S
        again = await schedule.start_due(deps, check)
        assert (again.started, again.recreated) == (1, 1)
        assert await queue.job_known(deps.pool, job_id)
        await take_job(deps.pool, job_id)  # lost again: the period's one retry is spent
        check += schedule.CHECK_AFTER_S
        assert (await schedule.start_due(deps, check)).started == 0
        next_start = schedule.next_period_start(merchant, check, EVERY)
        assert await next_look(redis, merchant) == next_start
        assert now < next_start <= now + EVERY

        # Its next period: started again, finishes, and waits for the period after.
        assert (await schedule.start_due(deps, next_start)).started == 1
        nxt = queue.orders_reconcile_id(merchant, slot + 1)
        assert await queue.job_known(deps.pool, nxt)
        await take_job(deps.pool, nxt)
        await redis.set(keys.orders_reconcile_done(merchant), str(slot + 1))
        check = next_start + schedule.CHECK_AFTER_S
        assert (await schedule.start_due(deps, check)).started == 0
        assert await next_look(redis, merchant) == next_start + EVERY

    async def test_a_revoked_store_leaves_the_schedule_for_good(
        self, deps: Deps, redis: Redis
    ) -> None:
        merchant, now = 3401, int(time.time())
        await tokens.save(redis, merchant, token(14 * DAY))
        assert (await schedule.start_due(deps, now)).started == 1
        await tokens.revoke(redis, merchant, "uninstalled")
        assert (await schedule.start_due(deps, now + EVERY)).looked == 0
        assert await next_look(redis, merchant) is None
        # Authorized again: scheduled again, at once.
        await tokens.save(redis, merchant, token(14 * DAY))
        assert (await schedule.start_due(deps, now + EVERY)).started == 1

    async def test_new_tokens_keep_a_scheduled_stores_time(self, redis: Redis) -> None:
        await tokens.save(redis, 3501, token(14 * DAY))
        await redis.zadd(keys.orders_reconcile_due(keys.index_shard(3501)), {"3501": 42})
        await tokens.save(redis, 3501, token(14 * DAY))  # a refresh
        assert await next_look(redis, 3501) == 42


class TestIndexTags:
    """The 16 index shards land evenly on the masters of an evenly split cluster."""

    @pytest.mark.parametrize("masters", [2, 3, 4, 5, 6, 8])
    def test_shards_spread_evenly(self, masters: int) -> None:
        from redis.crc import key_slot

        per_master = [0] * masters
        for shard in keys.index_shards():
            slot = key_slot(keys.stores_pending(shard).encode())
            assert slot == key_slot(keys.grant_log(shard).encode())  # one slot per shard
            per_master[slot * masters // 16384] += 1
        expected = keys.INDEX_SHARDS / masters
        assert all(abs(count - expected) < 1 for count in per_master), per_master
