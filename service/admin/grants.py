"""Grants an operator looks at and sends again: failed, in review, unknown outcome, parked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import ledger, queue


async def in_state(redis: Redis, kind: str, merchant: int | None) -> list[ledger.Grant]:
    """Every grant in state `kind`, of one store or of every store that has such grants."""
    merchants = [merchant] if merchant else await ledger.stores_with(redis, kind)
    found: list[ledger.Grant] = []
    for store in merchants:
        found += await ledger.grants_in(redis, kind, store)
    return found


async def chosen(
    redis: Redis, grant_ids: tuple[str, ...], kind: str, merchant: int | None
) -> list[ledger.Grant]:
    """The grants named by id, else every grant of `merchant` in state `kind`."""
    if grant_ids:
        return await ledger.load(redis, list(grant_ids))
    return await ledger.grants_in(redis, kind, merchant or 0)


async def retry(
    redis: Redis,
    pool: ArqRedis,
    grants: Iterable[ledger.Grant],
    kind: str,
    stop: asyncio.Event,
) -> tuple[int, bool]:
    """Move each grant still in state `kind` back to pending, atomically one by one, and ask
    for a flush of every store touched: (grants moved, whether `stop` ended it early). What was
    moved is sent, interrupted or not."""
    moved, interrupted = 0, False
    stores = set()
    for grant in grants:
        if stop.is_set():
            interrupted = True
            break
        if grant.state == kind and await ledger.requeue(redis, grant.merchant, grant, kind):
            moved += 1
            stores.add(grant.merchant)
    for store in stores:
        await queue.enqueue_flush(pool, store, 0)
    return moved, interrupted
