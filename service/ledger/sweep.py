"""Recovering from dead workers and lost answers, store by store: claims that outlived their
worker, grants whose call got no answer, and the sets that say which stores have such work."""

from __future__ import annotations

from redis.asyncio import Redis

from service import keys, lua
from service.ledger.records import (
    LISTING_FRESH_S,
    LISTING_MARGIN_S,
    SETTLED_GRANT_TTL_S,
    Grant,
    now_ms,
)
from service.ledger.views import listed_stores, load

# KEYS: claimed, pending, unknown; ARGV: now, grant key prefix (grants found as the script runs,
# of KEYS[1]'s store and slot: see the note in grants.py).
_SWEEP = lua.Script("""#!lua
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local returned, unknown = 0, 0
for _, id in ipairs(ids) do
  local gkey = ARGV[2] .. id
  local state = redis.call('HGET', gkey, 'state')
  redis.call('ZREM', KEYS[1], id)
  if state == 'sending' then
    redis.call('HSET', gkey, 'state', 'unknown', 'error', 'worker stopped during the call')
    redis.call('ZADD', KEYS[3], ARGV[1], id)
    unknown = unknown + 1
  elseif state == 'claimed' then
    redis.call('HSET', gkey, 'state', 'pending')
    redis.call('ZADD', KEYS[2], ARGV[1], id)
    returned = returned + 1
  end
end
return {returned, unknown}
""")


async def sweep_claims(redis: Redis, merchant: int) -> tuple[int, int]:
    """Recover work of dead workers: claimed → pending; sending → unknown (never resent blindly)."""
    now = now_ms()
    if not await redis.zcount(keys.grant_set("claimed", merchant), "-inf", now):
        return 0, 0  # no claim outlived its worker (one that expires now waits for the next)
    # Some may become unknown: listed first (another slot, see `note_pending_work`).
    await redis.sadd(keys.stores_unknown(keys.index_shard(merchant)), str(merchant))  # type: ignore[misc]
    # duplicates: every script call names its store's keys like this (grants.py too).
    returned, unknown = await _SWEEP.run(
        redis,
        [
            keys.grant_set("claimed", merchant),
            keys.grant_set("pending", merchant),
            keys.grant_set("unknown", merchant),
        ],
        str(now),
        keys.grant_prefix(merchant),
    )
    return int(returned), int(unknown)


async def stores_with_work(redis: Redis) -> list[int]:
    return await listed_stores(redis, keys.stores_pending)


# KEYS: pending, claimed, verifying, the store's idle mark, its listed-at time, its orders
# asked about; ARGV: the youngest listing that may be forgotten (ms). Returns 1 when the store
# has been idle at two sweeps in a row and was not listed recently (the caller then drops it
# from the cross-store set).
_FORGET_IF_IDLE = lua.Script("""#!lua
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) == 0
   and redis.call('ZCARD', KEYS[3]) == 0 and redis.call('ZCARD', KEYS[6]) == 0 then
  if redis.call('EXISTS', KEYS[4]) == 1 then
    local listed = tonumber(redis.call('GET', KEYS[5]) or '0')
    if listed > tonumber(ARGV[1]) then return 0 end
    redis.call('DEL', KEYS[4])
    return 1
  end
  redis.call('SET', KEYS[4], '1', 'EX', 86400)
  return 0
end
redis.call('DEL', KEYS[4])
return 0
""")


async def forget_store_if_idle(redis: Redis, merchant: int, *, at_ms: int | None = None) -> None:
    """Drop `merchant` from the sweep set once it had nothing pending, claimed or being
    confirmed, and no order waiting for Salla's answer, at two calls in a row. Two: a worker
    lists the store (`note_pending_work`) just before it commits grants, in another slot, so
    one idle look could fall between the two.

    And not within `LISTING_FRESH_S` + `LISTING_MARGIN_S` of a worker's listing: a worker that
    listed the store skips listing it again for `LISTING_FRESH_S` (`ledger.apply`), so
    forgetting it meanwhile could leave that worker's next grants unlisted. The listing's time
    is written by the commit right after it, in the store's slot, where this script reads it.
    `at_ms`: the time to judge by (tests); now by default."""
    now = now_ms() if at_ms is None else at_ms
    youngest = now - int((LISTING_FRESH_S + LISTING_MARGIN_S) * 1000)
    idle = await _FORGET_IF_IDLE.run(
        redis,
        [
            keys.grant_set("pending", merchant),
            keys.grant_set("claimed", merchant),
            keys.grant_set("verifying", merchant),
            keys.idle_mark(merchant),
            keys.listed_at(merchant),
            keys.asked_salla(merchant),
        ],
        str(youngest),
    )
    if idle:
        await redis.srem(keys.stores_pending(keys.index_shard(merchant)), str(merchant))  # type: ignore[misc]


async def unknown_since(redis: Redis, merchant: int, before_ms: int) -> list[Grant]:
    """Unknown-outcome grants that have waited since before `before_ms`."""
    ids: list[str] = await redis.zrangebyscore(
        keys.grant_set("unknown", merchant), "-inf", before_ms
    )
    return await load(redis, ids)


async def unknown_due(redis: Redis, merchant: int, before_ms: int) -> int:
    """How many unknown-outcome grants have waited since before `before_ms` (the sweep's
    question: whether to queue the store's reconciliation; `unknown_since` loads them)."""
    return int(await redis.zcount(keys.grant_set("unknown", merchant), "-inf", before_ms))


async def stores_with_unknown(redis: Redis) -> list[int]:
    return await listed_stores(redis, keys.stores_unknown)


async def forget_unknown_store_if_empty(redis: Redis, merchant: int) -> None:
    if not await redis.zcard(keys.grant_set("unknown", merchant)):
        await redis.srem(keys.stores_unknown(keys.index_shard(merchant)), str(merchant))  # type: ignore[misc]


async def trim_grant_log(redis: Redis) -> int:
    """Drop grant ids older than the grant records themselves from the export's log, every
    shard of it (once per sweep, not once per event: cross-store keys). Returns how many went."""
    oldest_kept = now_ms() - SETTLED_GRANT_TTL_S * 1000
    async with redis.pipeline(transaction=False) as pipe:  # one trim per shard, each atomic
        for shard in keys.index_shards():
            pipe.zremrangebyscore(keys.grant_log(shard), "-inf", f"({oldest_kept}")
        return sum(await pipe.execute())
