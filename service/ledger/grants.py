"""A grant's life after the ledger made it: claimed, being sent, sent, failed, unknown, parked,
held for confirmation. Each transition is one atomic Redis step, written before the action it
allows (see the state diagram in service/ledger/__init__.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from service import autopipe, keys, lua
from service.ledger.commit import Writes, queue_commit
from service.ledger.records import SETTLED_GRANT_TTL_S, Grant, now_ms
from service.ledger.views import load

# The scripts below take their store's grant sets in KEYS. Those that claim or move the ids a
# set holds find each grant's hash as they run (ARGV's grant key prefix + the id): the
# exception to naming every key in KEYS, safe because the prefix carries the store's tag, the
# slot of KEYS[1]; `#!lua` makes a Redis Cluster refuse the script if it ever did not.

# KEYS: pending, claimed, verifying; ARGV: now, limit, claim deadline, grant key prefix, claim
# token, "1" to divert held grants, when to ask again about a diverted one (ms).
# Held grants (a return window ended) go to `verifying` instead: their order is confirmed with
# Salla before they may be sent. Returns {claimed ids, orders of the diverted grants}.
_CLAIM = lua.Script("""#!lua
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
""")

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
    ids, orders = await _CLAIM.run(
        redis,
        [
            keys.grant_set("pending", merchant),
            keys.grant_set("claimed", merchant),
            keys.grant_set("verifying", merchant),
        ],
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
_RELEASE_VERIFIED = lua.Script("""#!lua
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
""")


async def release_verified(redis: Redis, merchant: int, order_id: int) -> int:
    """The order was confirmed (and what it no longer deserves netted): its held grants that
    are still waiting go to pending, due now. Returns how many."""
    await note_pending_work(redis, merchant)
    released: int = await _RELEASE_VERIFIED.run(
        redis,
        [keys.grant_set("verifying", merchant), keys.grant_set("pending", merchant)],
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


# KEYS[1] claimed zset, KEYS[2..]: the grants' hashes; ARGV: claim token, batch id, deadline
# ms, the grants' ids (ARGV[4..], in KEYS[2..]'s order).
_MARK_SENDING = lua.Script("""#!lua
local owned = {}
for i = 2, #KEYS do
  local key, id = KEYS[i], ARGV[i + 2]
  local state = redis.call('HMGET', key, 'state', 'claim')
  if state[1] == 'claimed' and state[2] == ARGV[1] then
    redis.call('HSET', key, 'state', 'sending', 'batch', ARGV[2])
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
    owned[#owned + 1] = id
  end
end
return owned
""")


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
    owned: list[str] = await _MARK_SENDING.run(
        redis,
        [keys.grant_set("claimed", merchant), *(keys.grant(g.id) for g in grants)],
        token,
        batch,
        str(now_ms() + call_timeout_ms),
        *(g.id for g in grants),
    )
    mine = set(owned)
    return [g for g in grants if g.id in mine]


async def _move(
    redis: Redis,
    merchant: int,
    grants: Sequence[Grant],
    fields: Mapping[str, str | int],
    *,
    leave: keys.GrantSet | None = None,
    join: keys.GrantSet | None = None,
    at: int = 0,
    settled: bool = False,
    listing: str | None = None,
) -> None:
    """One atomic step for grants of one store: each leaves the `leave` set, takes `fields`,
    joins the `join` set (scored `at`), and expires with its settled record if `settled`. One
    commit (a script of the store's slot, every key in KEYS): a Redis Cluster runs no
    MULTI/EXEC from redis-py's cluster client, and a script costs one round trip too.
    `listing`: a cross-store set to list the store in first (another slot: queued before the
    commit in the same pipeline, so a crash between leaves the store listed, never missed)."""
    if not grants:
        return
    writes = Writes()
    for grant in grants:
        key = keys.grant(grant.id)
        if leave is not None:
            writes.zrem(keys.grant_set(leave, merchant), grant.id)
        writes.hset(key, mapping=fields)
        if join is not None:
            writes.zadd(keys.grant_set(join, merchant), {grant.id: at})
        if settled:
            writes.expire(key, SETTLED_GRANT_TTL_S)
    pipe = autopipe.auto(redis)
    listed = [pipe.execute("SADD", listing, str(merchant))] if listing else []
    await asyncio.gather(*listed, queue_commit(redis, writes))


async def release_unsent(
    redis: Redis, merchant: int, grants: Sequence[Grant], batch: str, due_ms: int, error: str
) -> bool:
    """Grants marked `sending` in `batch` whose call was never made (no replica confirmed the
    mark, so the flush stopped first): back to pending, due at `due_ms`. Only if every one is
    still `sending` in `batch` where this writes: after a failover the promoted master's copy
    may say otherwise (still `claimed`, or taken since), and then nothing is written and the
    sweep recovers them as a lost worker's. True if they moved.

    Left `sending`, the sweep would turn them `unknown` and each would cost a read of Salla's
    points history, every round for as long as the master has no replica."""
    if not grants:
        return True
    writes = Writes()
    fields: dict[str, str | int] = {"state": "pending", "due_ms": due_ms, "error": error}
    for grant in grants:
        key = keys.grant(grant.id)
        writes.check(key, "state", "sending")
        writes.check(key, "batch", batch)
        writes.zrem(keys.grant_set("claimed", merchant), grant.id)
        writes.hset(key, mapping={**fields, "batch": ""})
        writes.zadd(keys.grant_set("pending", merchant), {grant.id: due_ms})
    listing = keys.stores_pending(keys.index_shard(merchant))
    listed = autopipe.auto(redis).execute("SADD", listing, str(merchant))
    _, written = await asyncio.gather(listed, queue_commit(redis, writes))
    return bool(written)


async def unsend(redis: Redis, grants: Sequence[Grant]) -> None:
    """Salla refused the whole call (422), so nothing was applied: back to claimed, same owner."""
    stores: dict[int, list[Grant]] = {}
    for grant in grants:
        stores.setdefault(grant.merchant, []).append(grant)
    for merchant, mine in stores.items():
        await _move(redis, merchant, mine, {"state": "claimed", "batch": ""})


async def finish(
    redis: Redis,
    merchant: int,
    grants: Sequence[Grant],
    state: Literal["sent", "failed", "unknown"],
    error: str = "",
) -> None:
    at = now_ms()
    shard = keys.index_shard(merchant)
    fields: dict[str, str | int] = {"state": state, "error": error, "done_ms": at}
    if state == "sent":
        await _move(redis, merchant, grants, fields, leave="claimed", settled=True)
        return
    listing = keys.stores_unknown(shard) if state == "unknown" else keys.stores_attention(shard)
    await _move(
        redis, merchant, grants, fields, leave="claimed", join=state, at=at, listing=listing
    )


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
    fields: dict[str, str | int] = {"state": "pending", "due_ms": due_ms, "error": error}
    if isolate:
        fields["isolate"] = 1
    listing = keys.stores_pending(keys.index_shard(merchant))
    await _move(
        redis, merchant, grants, fields, leave="claimed", join="pending", at=due_ms, listing=listing
    )


async def park(redis: Redis, merchant: int, grants: Sequence[Grant], error: str) -> None:
    """The store has no usable token: keep its grants aside until it authorizes again."""
    listing = keys.stores_attention(keys.index_shard(merchant))
    fields = {"state": "parked", "error": error}
    await _move(
        redis,
        merchant,
        grants,
        fields,
        leave="claimed",
        join="parked",
        at=now_ms(),
        listing=listing,
    )


# KEYS: parked, pending; ARGV: now, grant key prefix (see the note at the top).
_UNPARK = lua.Script("""#!lua
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], ARGV[1], id)
  redis.call('HSET', ARGV[2] .. id, 'state', 'pending', 'error', '')
end
redis.call('DEL', KEYS[1])
return #ids
""")


async def unpark(redis: Redis, merchant: int) -> int:
    """Move every parked grant of `merchant` back to pending, due now."""
    await note_pending_work(redis, merchant)
    count: int = await _UNPARK.run(
        redis,
        [keys.grant_set("parked", merchant), keys.grant_set("pending", merchant)],
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
    shard = keys.index_shard(merchant)
    fields: dict[str, str | int] = {"state": outcome, "error": note}
    if outcome == "sent":
        fields["done_ms"] = at
        await _move(redis, merchant, grants, fields, leave="unknown", settled=True)
        return
    if outcome == "pending":
        fields["due_ms"] = at
    listing = keys.stores_pending(shard) if outcome == "pending" else keys.stores_attention(shard)
    await _move(
        redis, merchant, grants, fields, leave="unknown", join=outcome, at=at, listing=listing
    )


async def count_reconcile_attempt(redis: Redis, grant: Grant) -> int:
    return int(await redis.hincrby(keys.grant(grant.id), "reconcile_attempts", 1))  # type: ignore[misc]


async def requeue(redis: Redis, merchant: int, grant: Grant, from_kind: str) -> bool:
    """Put one failed/review/unknown/parked grant back to pending, due now (an operator's call);
    False if it is no longer in `from_kind` (another operator, or the sweep, moved it).

    Atomic per grant, so an interrupted bulk retry leaves every grant in one state or the other.
    """
    at = now_ms()
    writes = Writes()
    writes.check(keys.grant(grant.id), "state", from_kind)
    writes.zrem(keys.grant_set(keys.as_grant_set(from_kind), merchant), grant.id)
    writes.hset(keys.grant(grant.id), mapping={"state": "pending", "due_ms": at, "error": ""})
    writes.zadd(keys.grant_set("pending", merchant), {grant.id: at})
    listed = autopipe.auto(redis).execute(
        "SADD", keys.stores_pending(keys.index_shard(merchant)), str(merchant)
    )
    _, moved = await asyncio.gather(listed, queue_commit(redis, writes))
    return bool(moved)


async def note_pending_work(redis: Redis, merchant: int) -> None:
    """Tell the sweep that `merchant` may have unsent grants. Before the step that makes them:
    the set is a cross-store key (another slot), so it is never written inside a store's
    script, and a crash between the two leaves the store listed, never forgotten."""
    await redis.sadd(keys.stores_pending(keys.index_shard(merchant)), str(merchant))  # type: ignore[misc]
