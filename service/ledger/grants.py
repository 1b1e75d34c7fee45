"""A grant's life after the ledger made it: claimed, being sent, sent, failed, unknown, parked,
held for confirmation. Each transition is one atomic Redis step, written before the action it
allows (see the state diagram in service/ledger/__init__.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from service import keys
from service.ledger.records import SETTLED_GRANT_TTL_S, Grant, now_ms
from service.ledger.views import load

# KEYS: pending, claimed, verifying; ARGV: now, limit, claim deadline, grant key prefix, claim
# token, "1" to divert held grants, when to ask again about a diverted one (ms).
# Held grants (a return window ended) go to `verifying` instead: their order is confirmed with
# Salla before they may be sent. Returns {claimed ids, orders of the diverted grants}.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local claimed, orders = {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[4] .. id
  redis.call('ZREM', KEYS[1], id)
  local held = redis.call('HMGET', key, 'held', 'order')
  if ARGV[6] == '1' and held[1] == '1' then
    redis.call('ZADD', KEYS[3], ARGV[7], id)
    redis.call('HSET', key, 'state', 'verifying')
    orders[#orders + 1] = held[2] or '0'
  else
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    redis.call('HSET', key, 'state', 'claimed', 'claim', ARGV[5])
    claimed[#claimed + 1] = id
  end
end
return {claimed, orders}
"""

#: A held grant whose confirmation has not come back after this long is asked about again.
VERIFY_RETRY_MS = 60_000


@dataclass(frozen=True, slots=True)
class Claim:
    grants: list[Grant]
    #: Orders whose held grants went to `verifying`: the caller asks Salla about each.
    verify_orders: set[int]


async def claim_due(
    redis: Redis,
    merchant: int,
    *,
    limit: int,
    claim_timeout_ms: int,
    token: str,
    verify_held: bool = False,
) -> Claim:
    """Atomically move up to `limit` due grants from pending to claimed by `token` (a caller
    that forgets its token cannot match anything: it is required); load them.

    `verify_held`: held grants go to `verifying` instead, to be confirmed first.
    """
    now = now_ms()
    # duplicates: every script call names its store's keys like this (sweep.py too); one helper
    # would hide which keys each script may touch.
    ids, orders = await redis.eval(  # type: ignore[misc]
        _CLAIM,
        3,
        keys.grant_set("pending", merchant),
        keys.grant_set("claimed", merchant),
        keys.grant_set("verifying", merchant),
        str(now),
        str(limit),
        str(now + claim_timeout_ms),
        keys.grant_prefix(merchant),
        token,
        "1" if verify_held else "0",
        str(now + VERIFY_RETRY_MS),
    )
    verify = {int(o) for o in orders if str(o).isdigit() and int(o)}
    return Claim(await load(redis, ids), verify)


# KEYS: verifying, pending; ARGV: order id, now, grant key prefix.
_RELEASE_VERIFIED = """
local released = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[3] .. id
  local g = redis.call('HMGET', key, 'state', 'order')
  if g[1] == false then
    redis.call('ZREM', KEYS[1], id)
  elseif g[2] == ARGV[1] then
    redis.call('ZREM', KEYS[1], id)
    if g[1] == 'verifying' then
      redis.call('HSET', key, 'state', 'pending', 'held', '0', 'due_ms', ARGV[2])
      redis.call('ZADD', KEYS[2], ARGV[2], id)
      released = released + 1
    end
  end
end
return released
"""


async def release_verified(redis: Redis, merchant: int, order_id: int) -> int:
    """The order was confirmed (and what it no longer deserves netted): its held grants that
    are still waiting go to pending, due now. Returns how many."""
    await note_pending_work(redis, merchant)
    released: int = await redis.eval(  # type: ignore[misc]
        _RELEASE_VERIFIED,
        2,
        keys.grant_set("verifying", merchant),
        keys.grant_set("pending", merchant),
        str(order_id),
        str(now_ms()),
        keys.grant_prefix(merchant),
    )
    return int(released)


async def verifying_overdue(redis: Redis, merchant: int) -> set[int]:
    """Orders whose held grants have waited for their confirmation too long (a lost job)."""
    ids: list[str] = await redis.zrangebyscore(
        keys.grant_set("verifying", merchant), "-inf", now_ms()
    )
    if not ids:
        return set()
    await redis.zadd(
        keys.grant_set("verifying", merchant), {g: now_ms() + VERIFY_RETRY_MS for g in ids}
    )
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hget(keys.grant(grant_id), "order")
        orders: list[str | None] = await pipe.execute()
    return {int(o) for o in orders if o and str(o).isdigit() and int(o)}


async def extend_claims(
    redis: Redis, merchant: int, grants: Sequence[Grant], timeout_ms: int
) -> None:
    """A live flush's heartbeat: its claims stay its own while it keeps working."""
    if grants:
        await redis.zadd(
            keys.grant_set("claimed", merchant),
            {g.id: now_ms() + timeout_ms for g in grants},
            xx=True,
        )


# KEYS[1] claimed zset; ARGV: grant key prefix, claim token, batch id, deadline ms, ids...
_MARK_SENDING = """
local owned = {}
for i = 5, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local state = redis.call('HMGET', key, 'state', 'claim')
  if state[1] == 'claimed' and state[2] == ARGV[2] then
    redis.call('HSET', key, 'state', 'sending', 'batch', ARGV[3])
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[i])
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
"""


async def mark_sending(
    redis: Redis,
    merchant: int,
    grants: Sequence[Grant],
    batch: str,
    *,
    token: str = "",
    call_timeout_ms: int = 60_000,
) -> list[Grant]:
    """Written before the HTTP call: a crash after this point is an unknown outcome.

    Only grants still claimed by `token` are marked (a flush that stalled past its claim may
    have lost some to another worker); the call must go to exactly the returned grants. Their
    claim deadline moves past the call's timeout, so the sweeper leaves a live call alone.
    """
    owned: list[str] = await redis.eval(  # type: ignore[misc]
        _MARK_SENDING,
        1,
        keys.grant_set("claimed", merchant),
        keys.grant_prefix(merchant),
        token,
        batch,
        str(now_ms() + call_timeout_ms),
        *(g.id for g in grants),
    )
    mine = set(owned)
    return [g for g in grants if g.id in mine]


async def unsend(redis: Redis, grants: Sequence[Grant]) -> None:
    """Salla refused the whole call (422), so nothing was applied: back to claimed, same owner."""
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.hset(keys.grant(grant.id), mapping={"state": "claimed", "batch": ""})
        await pipe.execute()


async def finish(
    redis: Redis,
    merchant: int,
    grants: Sequence[Grant],
    state: Literal["sent", "failed", "unknown"],
    error: str = "",
) -> None:
    at = now_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.hset(keys.grant(grant.id), mapping={"state": state, "error": error, "done_ms": at})
            pipe.zrem(keys.grant_set("claimed", merchant), grant.id)
            if state == "sent":
                pipe.expire(keys.grant(grant.id), SETTLED_GRANT_TTL_S)
            else:
                pipe.zadd(keys.grant_set(state, merchant), {grant.id: at})
        if state == "unknown":
            pipe.sadd(keys.STORES_UNKNOWN, str(merchant))
        await pipe.execute()


async def release(
    redis: Redis,
    merchant: int,
    grants: Sequence[Grant],
    due_ms: int,
    error: str = "",
    *,
    isolate: bool = False,
) -> None:
    """Return claimed grants to pending, due at `due_ms` (a retry, or work left over).

    `isolate` makes each grant go alone next time (it was in a batch Salla refused).
    """
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            fields: dict[str, str | int] = {"state": "pending", "due_ms": due_ms, "error": error}
            if isolate:
                fields["isolate"] = 1
            pipe.hset(keys.grant(grant.id), mapping=fields)
            pipe.zrem(keys.grant_set("claimed", merchant), grant.id)
            pipe.zadd(keys.grant_set("pending", merchant), {grant.id: due_ms})
        pipe.sadd(keys.STORES_PENDING, str(merchant))
        await pipe.execute()


async def park(redis: Redis, merchant: int, grants: Sequence[Grant], error: str) -> None:
    """The store has no usable token: keep its grants aside until it authorizes again."""
    at = now_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.hset(keys.grant(grant.id), mapping={"state": "parked", "error": error})
            pipe.zrem(keys.grant_set("claimed", merchant), grant.id)
            pipe.zadd(keys.grant_set("parked", merchant), {grant.id: at})
        await pipe.execute()


_UNPARK = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], ARGV[1], id)
  redis.call('HSET', ARGV[2] .. id, 'state', 'pending', 'error', '')
end
redis.call('DEL', KEYS[1])
return #ids
"""


async def unpark(redis: Redis, merchant: int) -> int:
    """Move every parked grant of `merchant` back to pending, due now."""
    await note_pending_work(redis, merchant)
    count: int = await redis.eval(  # type: ignore[misc]
        _UNPARK,
        2,
        keys.grant_set("parked", merchant),
        keys.grant_set("pending", merchant),
        str(now_ms()),
        keys.grant_prefix(merchant),
    )
    return count


async def resolve_unknown(
    redis: Redis,
    merchant: int,
    grants: Sequence[Grant],
    outcome: Literal["sent", "pending", "review"],
    note: str,
) -> None:
    """Settle grants whose call got no answer, from what Salla's history says (or not)."""
    at = now_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.zrem(keys.grant_set("unknown", merchant), grant.id)
            fields: dict[str, str | int] = {"state": outcome, "error": note}
            if outcome == "pending":
                fields["due_ms"] = at
                pipe.zadd(keys.grant_set("pending", merchant), {grant.id: at})
            elif outcome == "review":
                pipe.zadd(keys.grant_set("review", merchant), {grant.id: at})
            else:
                fields["done_ms"] = at
            pipe.hset(keys.grant(grant.id), mapping=fields)
            if outcome == "sent":
                pipe.expire(keys.grant(grant.id), SETTLED_GRANT_TTL_S)
        if outcome == "pending":
            pipe.sadd(keys.STORES_PENDING, str(merchant))
        await pipe.execute()


async def count_reconcile_attempt(redis: Redis, grant: Grant) -> int:
    return int(await redis.hincrby(keys.grant(grant.id), "reconcile_attempts", 1))  # type: ignore[misc]


async def requeue(redis: Redis, merchant: int, grant: Grant, from_kind: str) -> bool:
    """Put one failed/review/unknown/parked grant back to pending, due now (an operator's call).

    Atomic per grant, so an interrupted bulk retry leaves every grant in one state or the other.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(keys.grant_set(keys.as_grant_set(from_kind), merchant), grant.id)
        pipe.hset(
            keys.grant(grant.id), mapping={"state": "pending", "due_ms": now_ms(), "error": ""}
        )
        pipe.zadd(keys.grant_set("pending", merchant), {grant.id: now_ms()})
        pipe.sadd(keys.STORES_PENDING, str(merchant))
        removed, *_ = await pipe.execute()
    return bool(removed)


async def note_pending_work(redis: Redis, merchant: int) -> None:
    """Tell the sweep that `merchant` may have unsent grants. Before the step that makes them:
    the set is a cross-store key (another slot), so it is never written inside a store's
    script, and a crash between the two leaves the store listed, never forgotten."""
    await redis.sadd(keys.STORES_PENDING, str(merchant))  # type: ignore[misc]
