"""Read-only views of the ledger: grants by state, what a scope was granted, per-store gauges
(admin, metrics, the CLI). Nothing here writes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


async def stores_with(redis: Redis, kind: str) -> list[int]:
    """Merchants that have grants listed under `kind` (failed, review, unknown, parked...)."""
    merchants = set()
    async for key in redis.scan_iter(keys.grant_set(keys.as_grant_set(kind), "*")):
        merchant = keys.store_of(key)
        if merchant is not None:
            merchants.add(merchant)
    return sorted(merchants)


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
