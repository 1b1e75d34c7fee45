"""A balance that is right and stays right: "eventually 15" alone cannot catch a double credit
that lands after the check, so the check waits for the queue to go quiet and looks again."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from service import inbox, keys
from service.sandbox.app import Sandbox

IN_FLIGHT: tuple[keys.GrantSet, ...] = ("pending", "claimed", "verifying")


async def quiet(redis: Redis, merchant: int) -> bool:
    """No webhook waiting in the inbox and no grant of the store on its way to Salla."""
    if (await inbox.backlog(redis)).total:
        return False
    for kind in IN_FLIGHT:
        if await redis.zcard(keys.grant_set(kind, merchant)):
            return False
    return True


async def settles_at(
    box: Sandbox,
    redis: Redis,
    merchant: int,
    customer: int,
    points: int,
    *,
    timeout_s: float = 15.0,
) -> None:
    """The customer's balance at Salla reaches `points`, the store's queue goes quiet, and the
    balance is still `points` after it (nothing was credited twice, late)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    def seen() -> int:
        store = box.stores.get(merchant)
        return store.balances.get(customer, 0) if store else 0

    while loop.time() < deadline:
        if seen() == points and await quiet(redis, merchant):
            await asyncio.sleep(0.3)  # one more flush window's worth of chances to go wrong
            if await quiet(redis, merchant):
                break
        await asyncio.sleep(0.05)
    assert seen() == points, f"balance {seen()}, expected {points} once the queue was quiet"
    assert await quiet(redis, merchant), "the store's queue did not go quiet"
