"""The ledger: what each (store, scope, rule) was granted, and every grant's state. Redis.

The order-state model: an event computes what a scope (an order, a review, a customer)
deserves *now* from each rule; only the difference from what the ledger says was granted
becomes a grant. Reprocessing an event is therefore harmless, and reversals come from the
ledger, never from today's rules. Each scope's entry is updated under WATCH/MULTI, so two
workers handling two events of one order cannot both add.

Grant states (each transition one atomic Redis step, written before the action it allows):

    pending ──claim──▶ claimed ──mark_sending──▶ sending ──▶ sent
       ▲                  │                         ├──▶ failed   (Salla refused it, e.g. 422)
       └──release─────────┘ (retry, no token)       └──▶ unknown  (no answer: never resent)
    parked: waiting for the store's tokens (moved back to pending on app.store.authorize)

Keys (all under the `sr:` prefix):
    led:{merchant}:{scope}     hash  customer, r:{rule} -> JSON {granted, reason, channels, version}
    grant:{id}                 hash  one grant (see `Grant`)
    pending:{merchant}         zset  grant ids by due time (ms)
    claimed:{merchant}         zset  grant ids by claim deadline (ms)
    parked:{merchant}          zset  grant ids waiting for tokens
    failed:{merchant}          zset  grant ids Salla refused, by time
    unknown:{merchant}         zset  grant ids whose call got no answer, by time
    stores:pending             set   merchants that may have pending grants
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from redis.asyncio import Redis
from redis.exceptions import WatchError

from service.rules.engine import Outcome
from service.rules.model import MAX_POINTS_PER_CALL

GrantState = Literal["pending", "claimed", "sending", "sent", "failed", "unknown", "parked"]

PREFIX = "sr:"
REVERSAL_PREFIX = "Reversal: "
STORES_PENDING = f"{PREFIX}stores:pending"


def now_ms() -> int:
    return int(time.time() * 1000)


def _key(kind: str, merchant: int) -> str:
    return f"{PREFIX}{kind}:{merchant}"


def entry_key(merchant: int, scope: str) -> str:
    return f"{PREFIX}led:{merchant}:{scope}"


def grant_key(grant_id: str) -> str:
    return f"{PREFIX}grant:{grant_id}"


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    merchant: int
    customer: int
    points: int
    type: Literal["plus", "minus"]
    reason: str
    channels: tuple[str, ...]
    scope: str
    rule: str
    state: GrantState = "pending"
    due_ms: int = 0
    created_ms: int = 0
    attempts: int = 0
    batch: str = ""
    error: str = ""
    trace_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def group_key(self) -> tuple[str, int, str, tuple[str, ...]]:
        """Grants with the same key can share one Salla call."""
        return (self.type, self.points, self.reason, self.channels)

    @property
    def signed_points(self) -> int:
        return self.points if self.type == "plus" else -self.points

    def to_redis(self) -> dict[str, str | int]:
        return {
            "id": self.id, "merchant": self.merchant, "customer": self.customer,
            "points": self.points, "type": self.type, "reason": self.reason,
            "channels": json.dumps(list(self.channels)), "scope": self.scope, "rule": self.rule,
            "state": self.state, "due_ms": self.due_ms, "created_ms": self.created_ms,
            "attempts": self.attempts, "batch": self.batch, "error": self.error,
            "trace_id": self.trace_id,
        }  # fmt: skip

    @classmethod
    def from_redis(cls, doc: dict[str, str]) -> Grant:
        grant_type: Literal["plus", "minus"] = "minus" if doc["type"] == "minus" else "plus"
        return cls(
            id=doc["id"], merchant=int(doc["merchant"]), customer=int(doc["customer"]),
            points=int(doc["points"]), type=grant_type, reason=doc["reason"],
            channels=tuple(json.loads(doc["channels"])), scope=doc["scope"], rule=doc["rule"],
            state=doc["state"],  # type: ignore[arg-type]
            due_ms=int(doc.get("due_ms", 0)), created_ms=int(doc.get("created_ms", 0)),
            attempts=int(doc.get("attempts", 0)), batch=doc.get("batch", ""),
            error=doc.get("error", ""), trace_id=doc.get("trace_id", ""),
        )  # fmt: skip


def _split(points: int) -> list[int]:
    """Salla takes at most 999,999 points per call: larger deltas become several grants."""
    parts = [MAX_POINTS_PER_CALL] * (points // MAX_POINTS_PER_CALL)
    if points % MAX_POINTS_PER_CALL:
        parts.append(points % MAX_POINTS_PER_CALL)
    return parts


async def apply_outcomes(
    redis: Redis,
    merchant: int,
    scope: str,
    customer: int,
    outcomes: Sequence[Outcome],
    *,
    revoke_all: bool = False,
    trace_id: str = "",
    due_ms: int | None = None,
) -> list[Grant]:
    """Bring the ledger entry of `scope` to what `outcomes` say it deserves; return new grants.

    `revoke_all` sets every rule recorded for the scope to 0, including rules that no longer
    exist: reversals are computed from the ledger, not from the current rules.
    """
    key = entry_key(merchant, scope)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                entry: dict[str, str] = await pipe.hgetall(key)  # type: ignore[misc]
                created_ms = now_ms()
                grants = _deltas(
                    entry, merchant, scope, customer, outcomes, revoke_all, trace_id,
                    created_ms, created_ms if due_ms is None else due_ms,
                )  # fmt: skip
                if not grants:
                    await pipe.reset()  # type: ignore[no-untyped-call]
                    return []
                pipe.multi()  # type: ignore[no-untyped-call]
                for rule_id, record in _new_entry_records(entry, grants, outcomes).items():
                    pipe.hset(key, f"r:{rule_id}", record)
                pipe.hset(key, "customer", str(customer or entry.get("customer", "0")))
                for grant in grants:
                    pipe.hset(grant_key(grant.id), mapping=grant.to_redis())
                    pipe.zadd(_key("pending", merchant), {grant.id: grant.due_ms})
                pipe.sadd(STORES_PENDING, str(merchant))
                await pipe.execute()
                return grants
            except WatchError:
                continue


def _deltas(
    entry: dict[str, str],
    merchant: int,
    scope: str,
    customer: int,
    outcomes: Sequence[Outcome],
    revoke_all: bool,
    trace_id: str,
    created_ms: int,
    due_ms: int,
) -> list[Grant]:
    customer = customer or int(entry.get("customer", "0"))
    targets: dict[str, tuple[int, str, tuple[str, ...]]] = {}
    for outcome in outcomes:
        if outcome.changes_ledger:
            targets[outcome.rule_id] = (outcome.deserved, outcome.reason, outcome.channels)
    if revoke_all:
        for field_name in entry:
            if field_name.startswith("r:"):
                targets[field_name[2:]] = (0, "", ())
    grants: list[Grant] = []
    for rule_id, (deserved, reason, channels) in targets.items():
        record = json.loads(entry.get(f"r:{rule_id}", "{}"))
        granted = int(record.get("granted", 0))
        delta = deserved - granted
        if delta == 0 or customer == 0:
            continue
        if deserved == 0:  # taken back: say so, with the reason the points were given for
            reason = REVERSAL_PREFIX + record.get("reason", rule_id)
            channels = tuple(record.get("channels", ()))
        grant_type: Literal["plus", "minus"] = "plus" if delta > 0 else "minus"
        for part in _split(abs(delta)):
            grants.append(
                Grant(
                    id=uuid.uuid4().hex,
                    merchant=merchant,
                    customer=customer,
                    points=part,
                    type=grant_type,
                    reason=reason,
                    channels=channels,
                    scope=scope,
                    rule=rule_id,
                    due_ms=due_ms,
                    created_ms=created_ms,
                    trace_id=trace_id,
                )
            )
    return grants


def _new_entry_records(
    entry: dict[str, str], grants: Iterable[Grant], outcomes: Sequence[Outcome]
) -> dict[str, str]:
    by_rule = {o.rule_id: o for o in outcomes}
    records: dict[str, str] = {}
    for grant in grants:
        old = json.loads(records.get(grant.rule) or entry.get(f"r:{grant.rule}", "{}"))
        granted = int(old.get("granted", 0)) + grant.signed_points
        outcome = by_rule.get(grant.rule)
        granting = outcome is not None and outcome.verdict == "grant" and outcome.deserved != 0
        records[grant.rule] = json.dumps(
            {
                "granted": granted,
                "reason": outcome.reason if granting and outcome else old.get("reason", ""),
                "channels": list(
                    outcome.channels if granting and outcome else old.get("channels", [])
                ),
                "version": outcome.rule_version if outcome else old.get("version", ""),
            },
            ensure_ascii=False,
        )
    return records


async def entry(redis: Redis, merchant: int, scope: str) -> dict[str, int]:
    """What the ledger says `scope` was granted, per rule (signed points)."""
    raw: dict[str, str] = await redis.hgetall(entry_key(merchant, scope))  # type: ignore[misc]
    return {
        name[2:]: int(json.loads(value)["granted"])
        for name, value in raw.items()
        if name.startswith("r:")
    }


# --- grant state transitions -------------------------------------------------------------

_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[3], id)
  redis.call('HSET', ARGV[4] .. id, 'state', 'claimed')
end
return ids
"""


async def claim_due(
    redis: Redis, merchant: int, *, limit: int, claim_timeout_ms: int
) -> list[Grant]:
    """Atomically move up to `limit` due grants from pending to claimed, and load them."""
    now = now_ms()
    ids: list[str] = await redis.eval(  # type: ignore[misc]
        _CLAIM, 2, _key("pending", merchant), _key("claimed", merchant),
        str(now), str(limit), str(now + claim_timeout_ms), f"{PREFIX}grant:",
    )  # fmt: skip
    return await load(redis, ids)


async def load(redis: Redis, ids: Sequence[str]) -> list[Grant]:
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hgetall(grant_key(grant_id))
        docs: list[dict[str, str]] = await pipe.execute()
    return [Grant.from_redis(doc) for doc in docs if doc]


async def mark_sending(redis: Redis, merchant: int, grants: Sequence[Grant], batch: str) -> None:
    """Written before the HTTP call: a crash after this point is an unknown outcome."""
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.hset(grant_key(grant.id), mapping={"state": "sending", "batch": batch})
            pipe.hincrby(grant_key(grant.id), "attempts", 1)
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
            pipe.hset(grant_key(grant.id), mapping={"state": state, "error": error, "done_ms": at})
            pipe.zrem(_key("claimed", merchant), grant.id)
            if state != "sent":
                pipe.zadd(_key(state, merchant), {grant.id: at})
        await pipe.execute()


async def release(
    redis: Redis, merchant: int, grants: Sequence[Grant], due_ms: int, error: str = ""
) -> None:
    """Return claimed grants to pending, due at `due_ms` (a retry, or work left over)."""
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.hset(
                grant_key(grant.id), mapping={"state": "pending", "due_ms": due_ms, "error": error}
            )
            pipe.zrem(_key("claimed", merchant), grant.id)
            pipe.zadd(_key("pending", merchant), {grant.id: due_ms})
        pipe.sadd(STORES_PENDING, str(merchant))
        await pipe.execute()


async def park(redis: Redis, merchant: int, grants: Sequence[Grant], error: str) -> None:
    """The store has no usable token: keep its grants aside until it authorizes again."""
    at = now_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for grant in grants:
            pipe.hset(grant_key(grant.id), mapping={"state": "parked", "error": error})
            pipe.zrem(_key("claimed", merchant), grant.id)
            pipe.zadd(_key("parked", merchant), {grant.id: at})
        await pipe.execute()


_UNPARK = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[2], ARGV[1], id)
  redis.call('HSET', ARGV[2] .. id, 'state', 'pending', 'error', '')
end
redis.call('DEL', KEYS[1])
if #ids > 0 then redis.call('SADD', KEYS[3], ARGV[3]) end
return #ids
"""


async def unpark(redis: Redis, merchant: int) -> int:
    """Move every parked grant of `merchant` back to pending, due now."""
    count: int = await redis.eval(  # type: ignore[misc]
        _UNPARK, 3, _key("parked", merchant), _key("pending", merchant), STORES_PENDING,
        str(now_ms()), f"{PREFIX}grant:", str(merchant),
    )  # fmt: skip
    return count


_SWEEP = """
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
"""


async def sweep_claims(redis: Redis, merchant: int) -> tuple[int, int]:
    """Recover work of dead workers: claimed → pending; sending → unknown (never resent blindly)."""
    returned, unknown = await redis.eval(  # type: ignore[misc]
        _SWEEP, 3, _key("claimed", merchant), _key("pending", merchant), _key("unknown", merchant),
        str(now_ms()), f"{PREFIX}grant:",
    )  # fmt: skip
    return int(returned), int(unknown)


async def due_count(redis: Redis, merchant: int, at_ms: int | None = None) -> int:
    return int(await redis.zcount(_key("pending", merchant), "-inf", at_ms or now_ms()))


async def stores_with_work(redis: Redis) -> list[int]:
    return [int(m) for m in await redis.smembers(STORES_PENDING)]  # type: ignore[misc]


_FORGET_IF_IDLE = """
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) == 0 then
  return redis.call('SREM', KEYS[3], ARGV[1])
end
return 0
"""


async def forget_store_if_idle(redis: Redis, merchant: int) -> None:
    """Drop `merchant` from the sweep set once it has nothing pending or claimed (atomically)."""
    await redis.eval(  # type: ignore[misc]
        _FORGET_IF_IDLE,
        3,
        _key("pending", merchant),
        _key("claimed", merchant),
        STORES_PENDING,
        str(merchant),
    )


async def grants_in(redis: Redis, kind: str, merchant: int) -> list[Grant]:
    """Grants listed under `kind` (pending, claimed, parked, failed, unknown) for a store."""
    ids: list[str] = await redis.zrange(_key(kind, merchant), 0, -1)
    return await load(redis, ids)
