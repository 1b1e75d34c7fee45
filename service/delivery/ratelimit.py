"""One leaky bucket per store, in Redis, shared by every worker process and machine.

Salla limits each store with a leaky bucket; the customers endpoints also have their own cap
(500 requests per 10 minutes). Our bucket starts from the configured size and is corrected by
every answer: `X-RateLimit-Remaining` can only make it more careful, `X-RateLimit-Remaining: 0`
blocks until `X-RateLimit-Reset`, and a 429's `Retry-After` blocks until then.

`take()` never sleeps: it answers how long to wait, and the flush job re-enqueues itself for
then, so a throttled store never holds a worker.

Two buckets per store: `customers` (the loyalty endpoints' cap) and `plan` (the store's plan
limit, 120/360/720 a minute, which every Admin API call counts against). Orders calls take from
the plan bucket; loyalty calls from both at once (`take(merchant, also=plan)`, atomically: a
request refused by one takes nothing from the other). The plan bucket is resized by the
`X-RateLimit-Limit` of orders answers (Salla knows the store's plan; we do not).
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from service import keys, lua

# KEYS: one bucket hash per bucket; ARGV: now_ms, then per bucket: capacity, window_ms.
# A bucket's own `capacity` field (from Salla's headers) wins over the configured one.
# Returns 0 when a request may go now (one is taken from every bucket), else the milliseconds
# to wait (nothing is taken).
_TAKE = lua.Script("""#!lua
local now = tonumber(ARGV[1])
local wait, levels = 0, {}
for i = 1, #KEYS do
  local state = redis.call('HMGET', KEYS[i], 'level', 'updated', 'blocked_until', 'capacity')
  local capacity = tonumber(state[4]) or tonumber(ARGV[i * 2])
  local leak = capacity / tonumber(ARGV[i * 2 + 1])
  local level = tonumber(state[1]) or 0
  local updated = tonumber(state[2]) or now
  local blocked = tonumber(state[3]) or 0
  level = math.max(0, level - (now - updated) * leak)
  if now < blocked then
    wait = math.max(wait, blocked - now)
  elseif level + 1 > capacity then
    wait = math.max(wait, math.max(1, math.ceil((level + 1 - capacity) / leak)))
  end
  levels[i] = {level, math.ceil(capacity / leak) + 60000}
end
if wait > 0 then return wait end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i][1] + 1), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[i], levels[i][2])
end
return 0
""")

# KEYS[1]; ARGV: now_ms, capacity, window_ms, remaining (-1 unknown), reset_ms (0 unknown),
# retry_after_ms (0 none), limit (0: keep the capacity as it is)
_OBSERVE = lua.Script("""#!lua
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[7])
if limit > 0 then redis.call('HSET', KEYS[1], 'capacity', ARGV[7]) end
local capacity = tonumber(redis.call('HGET', KEYS[1], 'capacity')) or tonumber(ARGV[2])
local leak = capacity / tonumber(ARGV[3])
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
""")


class RateLimiter:
    """One kind of bucket (`name`: "rl" for the customers endpoints, "rl-plan" for the plan)."""

    def __init__(
        self,
        redis: Redis,
        requests: int,
        window_s: float,
        *,
        name: str = "rl",
        resize: bool = False,
    ) -> None:
        self.redis = redis
        self.name = name
        self.capacity = requests
        self.window_ms = window_s * 1000
        self.leak_per_ms = requests / self.window_ms
        #: Salla's `X-RateLimit-Limit` resizes this bucket (the plan's limit).
        self.resize = resize

    def key(self, merchant: int) -> str:
        return keys.bucket(self.name, merchant)

    async def take(self, merchant: int, *, also: RateLimiter | None = None) -> float:
        """Take one request from the store's bucket (and from `also`'s, atomically); 0.0 means
        go, else seconds to wait."""
        buckets = [self] if also is None else [self, also]
        args: list[str] = [str(int(time.time() * 1000))]
        for bucket in buckets:
            args += [str(bucket.capacity), repr(bucket.window_ms)]
        wait_ms: int = await _TAKE.run(self.redis, [b.key(merchant) for b in buckets], *args)
        return wait_ms / 1000

    async def observe(
        self,
        merchant: int,
        *,
        remaining: int | None = None,
        reset_epoch_s: int | None = None,
        retry_after_s: float | None = None,
        limit: int | None = None,
    ) -> None:
        """Correct the bucket from what Salla answered (`limit`: its `X-RateLimit-Limit`,
        which resizes a bucket made with `resize=True`)."""
        await _OBSERVE.run(
            self.redis,
            [self.key(merchant)],
            str(int(time.time() * 1000)),
            str(self.capacity),
            repr(self.window_ms),
            str(-1 if remaining is None else remaining),
            str((reset_epoch_s or 0) * 1000),
            str(int((retry_after_s or 0) * 1000)),
            str(limit if self.resize and limit and limit > 0 else 0),
        )

    async def peek(self, merchant: int) -> dict[str, float]:
        """The bucket as it stands, without taking from it (for operators)."""
        level, updated, blocked, sized = await self.redis.hmget(  # type: ignore[misc]
            self.key(merchant), ["level", "updated", "blocked_until", "capacity"]
        )
        capacity = float(sized or self.capacity)
        now = time.time() * 1000
        leak = capacity / self.window_ms
        drained = max(0.0, float(level or 0) - (now - float(updated or now)) * leak)
        return {
            "capacity": capacity,
            "used": round(drained, 2),
            "available": round(max(0.0, capacity - drained), 2),
            "blocked_for_s": round(max(0.0, float(blocked or 0) - now) / 1000, 3),
        }
