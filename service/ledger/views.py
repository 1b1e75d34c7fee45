"""Read-only views of the ledger: grants by state, what a scope was granted, per-store gauges
(admin, metrics, the CLI). Nothing here writes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from redis.asyncio import Redis

from service import keys
from service.ledger.compact import read_stored
from service.ledger.order_state import RuleRecord
from service.ledger.records import Grant, now_ms


async def load(redis: Redis, ids: Sequence[str]) -> list[Grant]:
    """The grants of these ids that exist (a string that is not a grant id finds nothing)."""
    real = [g for g in ids if keys.grant_store(g) is not None]
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in real:
            pipe.hgetall(keys.grant(grant_id))
        docs: list[dict[str, str]] = await pipe.execute()
    return [Grant.from_redis(doc) for doc in docs if doc]


async def grants_in(redis: Redis, kind: str, merchant: int) -> list[Grant]:
    """Grants listed under `kind` (pending, claimed, parked, failed, unknown) for a store."""
    ids: list[str] = await redis.zrange(keys.grant_set(keys.as_grant_set(kind), merchant), 0, -1)
    return await load(redis, ids)


async def due_count(redis: Redis, merchant: int, at_ms: int | None = None) -> int:
    return int(await redis.zcount(keys.grant_set("pending", merchant), "-inf", at_ms or now_ms()))


async def listed_stores(redis: Redis, index: Callable[[int], str]) -> list[int]:
    """The stores a cross-store set lists, read from every index shard (one pipeline: reads
    of separate keys, nothing to keep atomic), in order."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.index_shards():
            pipe.smembers(index(shard))
        found: list[set[str]] = await pipe.execute()
    return sorted(int(m) for members in found for m in members)


#: The cross-store set that lists every store with grants in a state (a superset: a store stays
#: listed a while after its last such grant left, so each one's set is looked at).
_LISTED_IN: dict[str, Callable[[int], str]] = {
    "pending": keys.stores_pending,
    "claimed": keys.stores_pending,
    "verifying": keys.stores_pending,
    "unknown": keys.stores_unknown,
    "failed": keys.stores_attention,
    "review": keys.stores_attention,
    "parked": keys.stores_attention,
}


async def stores_with(redis: Redis, kind: str) -> list[int]:
    """Merchants that have grants listed under `kind` (failed, review, unknown, parked...): the
    stores the index shards list for it whose set of `kind` is not empty (no SCAN: a Redis
    Cluster scans one node at a time, and a scan reads every key)."""
    state = keys.as_grant_set(kind)
    listed = await listed_stores(redis, _LISTED_IN[state])
    async with redis.pipeline(transaction=False) as pipe:  # one ZCARD a store, nothing atomic
        for merchant in listed:
            pipe.zcard(keys.grant_set(state, merchant))
        sizes: list[int] = await pipe.execute()
    return [m for m, size in zip(listed, sizes, strict=True) if size]


async def store_gauges(redis: Redis, merchant: int) -> dict[str, float]:
    """Queue depth, age of the oldest due grant, and grants needing attention, for one store."""
    now = now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.grant_set("pending", merchant))
        pipe.zrangebyscore(
            keys.grant_set("pending", merchant), "-inf", now, start=0, num=1, withscores=True
        )
        for kind in ("failed", "review", "parked"):
            pipe.zcard(keys.grant_set(kind, merchant))
        pending, oldest, failed, review, parked = await pipe.execute()
    return {
        "pending": pending,
        "oldest_age_s": (now - oldest[0][1]) / 1000 if oldest else 0.0,
        "failed": failed,
        "review": review,
        "parked": parked,
    }


async def entry_fields(redis: Redis, merchant: int, scope: str) -> Mapping[str, str]:
    """A scope's entry as its full fields, a compacted order's read back."""
    order = scope.removeprefix("order:")
    if scope.startswith("order:") and order.isascii() and order.isdigit():
        return (await read_stored(redis, merchant, int(order))).raw
    raw: dict[str, str] = await redis.hgetall(keys.entry(merchant, scope))  # type: ignore[misc]
    return raw


async def entry(redis: Redis, merchant: int, scope: str) -> dict[str, int]:
    """What the ledger says `scope` was granted, per rule (signed points, all customers)."""
    raw = await entry_fields(redis, merchant, scope)
    return {
        name[2:]: RuleRecord.decode(value).granted_total
        for name, value in raw.items()
        if name.startswith("r:")
    }
