"""One leaky bucket per store, in Redis, shared by every worker process and machine.

Salla limits each store with a leaky bucket; the customers endpoints also have their own cap
(500 requests per 10 minutes). Our bucket starts from the configured size and is corrected by
every answer: `X-RateLimit-Remaining` can only make it more careful, `X-RateLimit-Remaining: 0`
blocks until `X-RateLimit-Reset`, and a 429's `Retry-After` blocks until then.

`take()` never sleeps: it answers how long to wait, and the flush job re-enqueues itself for
then, so a throttled store never holds a worker.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from service.ledger import PREFIX

# KEYS[1] bucket hash; ARGV: now_ms, capacity, leak_per_ms
# Returns 0 when a request may go now, else the milliseconds to wait.
_TAKE = """
local now = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local leak = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'level', 'updated', 'blocked_until')
local level = tonumber(state[1]) or 0
local updated = tonumber(state[2]) or now
local blocked = tonumber(state[3]) or 0
if now < blocked then return blocked - now end
level = math.max(0, level - (now - updated) * leak)
if level + 1 > capacity then
  return math.max(1, math.ceil((level + 1 - capacity) / leak))
end
redis.call('HSET', KEYS[1], 'level', tostring(level + 1), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / leak) + 60000)
return 0
"""

# KEYS[1]; ARGV: now_ms, capacity, leak_per_ms, remaining (-1 unknown), reset_ms (0 unknown),
# retry_after_ms (0 none)
_OBSERVE = """
local now = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local leak = tonumber(ARGV[3])
local remaining = tonumber(ARGV[4])
local reset = tonumber(ARGV[5])
local retry_after = tonumber(ARGV[6])
local state = redis.call('HMGET', KEYS[1], 'level', 'updated', 'blocked_until')
local level = tonumber(state[1]) or 0
local updated = tonumber(state[2]) or now
local blocked = tonumber(state[3]) or 0
level = math.max(0, level - (now - updated) * leak)
if remaining >= 0 then level = math.max(level, capacity - remaining) end
if retry_after > 0 then blocked = math.max(blocked, now + retry_after) end
if remaining == 0 and reset > now then blocked = math.max(blocked, reset) end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now),
           'blocked_until', tostring(blocked))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / leak) + 60000)
return blocked
"""


class RateLimiter:
    def __init__(self, redis: Redis, requests: int, window_s: float) -> None:
        self.redis = redis
        self.capacity = requests
        self.leak_per_ms = requests / (window_s * 1000)

    @staticmethod
    def key(merchant: int) -> str:
        return f"{PREFIX}rl:{merchant}"

    async def take(self, merchant: int) -> float:
        """Take one request from the store's bucket; 0.0 means go, else seconds to wait."""
        wait_ms: int = await self.redis.eval(  # type: ignore[misc]
            _TAKE,
            1,
            self.key(merchant),
            str(int(time.time() * 1000)),
            str(self.capacity),
            repr(self.leak_per_ms),
        )
        return wait_ms / 1000

    async def observe(
        self,
        merchant: int,
        *,
        remaining: int | None = None,
        reset_epoch_s: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """Correct the bucket from what Salla answered."""
        await self.redis.eval(  # type: ignore[misc]
            _OBSERVE,
            1,
            self.key(merchant),
            str(int(time.time() * 1000)),
            str(self.capacity),
            repr(self.leak_per_ms),
            str(-1 if remaining is None else remaining),
            str((reset_epoch_s or 0) * 1000),
            str(int((retry_after_s or 0) * 1000)),
        )

    async def peek(self, merchant: int) -> dict[str, float]:
        """The bucket as it stands, without taking from it (for operators)."""
        level, updated, blocked = await self.redis.hmget(  # type: ignore[misc]
            self.key(merchant), ["level", "updated", "blocked_until"]
        )
        now = time.time() * 1000
        drained = max(0.0, float(level or 0) - (now - float(updated or now)) * self.leak_per_ms)
        return {
            "capacity": self.capacity,
            "used": round(drained, 2),
            "available": round(max(0.0, self.capacity - drained), 2),
            "blocked_for_s": round(max(0.0, float(blocked or 0) - now) / 1000, 3),
        }
