"""The shared per-store leaky bucket on a real Redis."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from service.delivery.ratelimit import RateLimiter


class TestRateLimiter:
    """Atomic across concurrent takers, corrected by Salla's headers."""

    async def test_concurrent_takers_never_exceed_the_bucket(self, redis: Redis) -> None:
        limiter = RateLimiter(redis, requests=10, window_s=600)
        waits = await asyncio.gather(*(limiter.take(1) for _ in range(50)))
        assert sum(1 for w in waits if w == 0) == 10
        assert all(w > 0 for w in waits if w)

    async def test_the_bucket_leaks_at_the_configured_rate(self, redis: Redis) -> None:
        limiter = RateLimiter(redis, requests=5, window_s=0.5)  # 10 per second
        assert [await limiter.take(1) for _ in range(5)] == [0, 0, 0, 0, 0]
        wait = await limiter.take(1)
        assert 0 < wait <= 0.11
        await asyncio.sleep(wait + 0.01)
        assert await limiter.take(1) == 0

    async def test_stores_have_separate_buckets(self, redis: Redis) -> None:
        limiter = RateLimiter(redis, requests=1, window_s=600)
        assert await limiter.take(1) == 0
        assert await limiter.take(1) > 0
        assert await limiter.take(2) == 0

    async def test_remaining_zero_blocks_until_reset(self, redis: Redis) -> None:
        limiter = RateLimiter(redis, requests=100, window_s=600)
        await limiter.observe(1, remaining=0, reset_epoch_s=int(time.time()) + 30)
        assert 25 < await limiter.take(1) <= 31

    async def test_retry_after_blocks(self, redis: Redis) -> None:
        limiter = RateLimiter(redis, requests=100, window_s=600)
        await limiter.observe(1, retry_after_s=7)
        assert 6 < await limiter.take(1) <= 7

    async def test_low_remaining_makes_the_bucket_more_careful(self, redis: Redis) -> None:
        limiter = RateLimiter(redis, requests=100, window_s=600)
        await limiter.observe(1, remaining=2)
        assert [await limiter.take(1) == 0 for _ in range(3)] == [True, True, False]
