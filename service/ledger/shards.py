"""Reading the cross-store zsets kept per index shard (`keys.index_shards`): what is due.

The schedules of every store (compaction, token expiry, orders reconciliation) are each 16
zsets; a periodic job reads the stores due from all of them at once, soonest first.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from service import keys


async def due_in_shards(
    redis: Redis, index: Callable[[int], str], upto: float, *, per_shard: int, low: str = "-inf"
) -> list[tuple[int, float]]:
    """The stores a cross-store zset scores in [`low`, `upto`], from every index shard (at
    most `per_shard` each, one pipeline: reads, nothing atomic), soonest first, with scores."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.index_shards():
            pipe.zrangebyscore(index(shard), low, upto, start=0, num=per_shard, withscores=True)
        found: list[list[tuple[str, float]]] = await pipe.execute()
    return sorted(((int(m), score) for listed in found for m, score in listed), key=_by_score)


def _by_score(item: tuple[int, float]) -> tuple[float, int]:
    return item[1], item[0]
