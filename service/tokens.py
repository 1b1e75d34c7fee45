"""Per-store OAuth tokens in Redis, refreshed under a per-store lock.

Salla's refresh tokens are single-use: two workers refreshing at once make Salla revoke both
tokens. A refresh therefore takes the store's refresh lock (`keys.refresh_lock`), re-reads the
tokens (another worker may have refreshed meanwhile), refreshes, and stores both new tokens
before releasing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import keys, lua
from service.errors import SallaAuthError
from service.ledger.shards import due_in_shards
from service.logging import get_logger
from service.salla import SallaClient, TokenSet

log = get_logger("service.tokens")

#: Waits until a replica holds every write of a key's slot so far (`state_store.ReplicaWait`).
Replicated = Callable[[str], Awaitable[None]]


def store_key(merchant: int) -> str:
    return keys.store(merchant)


#: The store record's field saying why Salla cannot be asked about the store's orders
#: (service/orders/truth.py); new tokens clear it.
ORDER_TRUTH_UNAVAILABLE = "order_truth_unavailable"


async def save(redis: Redis, merchant: int, tokens: TokenSet) -> None:
    """Keep a store's new tokens. Listed first (cross-store keys, another slot), so a store
    with tokens is always listed: by its token's expiry (the refresh job reads only the due)
    and in the orders reconciliation's schedule (once: a store already there keeps its time)."""
    shard = keys.index_shard(merchant)
    async with redis.pipeline(transaction=False) as pipe:  # two keys of the shard's slot
        pipe.zadd(keys.token_expiry(shard), {str(merchant): max(tokens.expires_at_s, 0)})
        pipe.zadd(keys.orders_reconcile_due(shard), {str(merchant): int(time.time())}, nx=True)
        await pipe.execute()
    await redis.hdel(store_key(merchant), ORDER_TRUTH_UNAVAILABLE)  # type: ignore[misc]
    await redis.hset(  # type: ignore[misc]
        store_key(merchant),
        mapping={
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
            "expires_at_s": tokens.expires_at_s,
            "scope": tokens.scope,
            "status": "authorized",
            "updated_s": int(time.time()),
        },
    )


async def get(redis: Redis, merchant: int) -> TokenSet | None:
    doc: dict[str, str] = await redis.hgetall(store_key(merchant))  # type: ignore[misc]
    return from_record(doc)


def from_record(doc: dict[str, str]) -> TokenSet | None:
    """The usable tokens in a store's record (`store_key`), or None."""
    if not doc.get("access_token") or doc.get("status") != "authorized":
        return None
    return TokenSet(
        access_token=doc["access_token"],
        refresh_token=doc.get("refresh_token", ""),
        expires_at_s=int(doc.get("expires_at_s", "0") or 0),
        scope=doc.get("scope", ""),
    )


async def mark_installed(redis: Redis, merchant: int, event: str) -> None:
    await redis.hset(  # type: ignore[misc]
        store_key(merchant), mapping={"installed_event": event, "installed_s": int(time.time())}
    )


async def note_install_time(redis: Redis, merchant: int, at_epoch_s: float | None) -> None:
    """Keep the earliest `app.installed` / `app.store.authorize` envelope time: orders created
    before it are left to `orders backfill`, not to reconciliation."""
    if at_epoch_s is not None:
        await _KEEP_EARLIEST.run(redis, [store_key(merchant)], str(int(at_epoch_s)))


_KEEP_EARLIEST = lua.Script("""#!lua
local have = tonumber(redis.call('HGET', KEYS[1], 'installed_at_s') or '')
if have == nil or tonumber(ARGV[1]) < have then
  redis.call('HSET', KEYS[1], 'installed_at_s', ARGV[1])
end
return 1
""")


async def installed_at(redis: Redis, merchant: int) -> int | None:
    """When the store first installed or authorized the app (envelope time), if known."""
    raw = await redis.hget(store_key(merchant), "installed_at_s")  # type: ignore[misc]
    return int(raw) if raw and str(raw).isdigit() else None


# KEYS[1]: the store's record; ARGV: the new status, now (s).
_REVOKE = lua.Script("""#!lua
redis.call('HDEL', KEYS[1], 'access_token', 'refresh_token', 'expires_at_s')
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_s', ARGV[2])
return 1
""")


async def revoke(redis: Redis, merchant: int, status: str) -> None:
    """The tokens are dead (uninstalled, or refresh refused): forget them, keep the record.

    The record changes in one script (its slot); the store leaves the cross-store indexes
    after, so a store with tokens is never unlisted (a crash between leaves one listed without
    tokens, which every reader of them skips)."""
    await _REVOKE.run(redis, [store_key(merchant)], status, str(int(time.time())))
    shard = keys.index_shard(merchant)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(keys.token_expiry(shard), str(merchant))
        pipe.zrem(keys.orders_reconcile_due(shard), str(merchant))
        await pipe.execute()


_RELEASE = lua.Script("""#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


async def refresh(
    redis: Redis,
    client: SallaClient,
    merchant: int,
    stale_access_token: str,
    *,
    token_url: str,
    client_id: str,
    client_secret: str,
    lock_timeout_s: float = 30.0,
    replicated: Replicated | None = None,
) -> TokenSet:
    """Refresh `merchant`'s tokens once, whichever worker gets there first.

    Raises `SallaAuthError` when the store cannot be refreshed (no refresh token, or Salla
    refused it); the caller parks the store's grants until it authorizes again.

    `replicated` (on a cluster): the new tokens are confirmed on a replica before the lock is
    released (`_keep`).
    """
    lock_key = keys.refresh_lock(merchant)
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + lock_timeout_s
    while not await redis.set(lock_key, owner, nx=True, px=int(lock_timeout_s * 1000)):
        if time.monotonic() > deadline:
            raise SallaAuthError(0, None, "timed out waiting for another worker's token refresh")
        await asyncio.sleep(0.05)
    try:
        current = await get(redis, merchant)
        if current is None:
            raise SallaAuthError(0, None, "the store has no tokens (not authorized or uninstalled)")
        if current.access_token != stale_access_token:
            return current  # another worker refreshed while we waited
        if not current.refresh_token:
            raise SallaAuthError(0, None, "the store has no refresh token")
        try:
            fresh = await client.refresh(token_url, client_id, client_secret, current.refresh_token)
        except SallaAuthError:
            await revoke(redis, merchant, "refresh_refused")
            raise
        await save(redis, merchant, fresh)
        if replicated is not None:
            await _keep(redis, merchant, fresh, replicated)
        return fresh
    finally:
        await _RELEASE.run(redis, [lock_key], owner)


#: How many times new tokens are written and waited for before giving up (`_keep`).
KEEP_ATTEMPTS = 3


async def _keep(redis: Redis, merchant: int, fresh: TokenSet, replicated: Replicated) -> None:
    """Salla's refresh tokens are single-use: new tokens a failover lost would bring back the
    spent one, whose next refresh Salla refuses (the store must install again). So they are
    confirmed on a replica; unconfirmed, written again and waited for again (a failover
    between the write and the wait: the promoted master may lack them; they are still in
    hand). Given up after `KEEP_ATTEMPTS`, loudly: nothing else can be done."""
    for _ in range(KEEP_ATTEMPTS):
        try:
            await replicated(keys.replica_mark(merchant))
            return
        except RedisError as exc:
            log.warning("token_save_unconfirmed", merchant=merchant, error=str(exc))
        try:
            await save(redis, merchant, fresh)
        except RedisError as exc:
            log.warning("token_save_failed", merchant=merchant, error=str(exc))
            await asyncio.sleep(0.5)
    log.error(
        "token_refresh_unconfirmed",
        merchant=merchant,
        consequence="a failover now could bring back the spent refresh token",
    )


async def authorized_stores(redis: Redis) -> list[int]:
    """Every store with tokens, from every index shard (for tests and tools: the periodic
    jobs read only the stores due)."""
    async with redis.pipeline(transaction=False) as pipe:  # one read per shard, nothing atomic
        for shard in keys.index_shards():
            pipe.zrange(keys.token_expiry(shard), 0, -1)
        found: list[list[str]] = await pipe.execute()
    return sorted(int(m) for members in found for m in members)


#: At most this many stores' tokens are refreshed by one run of the refresh job (the most
#: urgent first; the rest wait for the next run, ten minutes later, well within the default
#: two days ahead of expiry).
REFRESH_BATCH = 500


async def expiring(
    redis: Redis, within_s: int, *, limit: int = REFRESH_BATCH
) -> list[tuple[int, TokenSet]]:
    """Authorized stores whose access token expires within `within_s` seconds, soonest first:
    found through the expiry index (`keys.token_expiry`), so a run reads the stores due, not
    every store; each one's record is read again, the index being only a pointer to it."""
    soon = int(time.time()) + within_s
    due = await due_in_shards(redis, keys.token_expiry, soon, per_shard=limit, low="(0")
    result = []
    for merchant, _ in due[:limit]:
        current = await get(redis, merchant)
        if current and current.refresh_token and 0 < current.expires_at_s <= soon:
            result.append((merchant, current))
    return result


_LIFECYCLE_GUARD = lua.Script("""#!lua
local current = tonumber(redis.call('HGET', KEYS[1], 'lifecycle_at') or '0')
local incoming = tonumber(ARGV[1])
if incoming < current then return 0 end
redis.call('HSET', KEYS[1], 'lifecycle_at', ARGV[1])
return 1
""")


async def lifecycle_is_current(redis: Redis, merchant: int, at_epoch_s: float | None) -> bool:
    """Record an app lifecycle event's time; False when a newer one was already applied.

    Jobs run concurrently and Salla re-sends, so an old `app.store.authorize` can arrive after
    `app.uninstalled`. Events whose time cannot be read are applied.
    """
    if at_epoch_s is None:
        return True
    applied: int = await _LIFECYCLE_GUARD.run(redis, [store_key(merchant)], repr(at_epoch_s))
    return bool(applied)
