"""The ledger: what each (store, scope, rule) was granted, and every grant's state. Redis.

The order-state model: an event computes what a scope (an order, a review, a customer)
deserves *now* from each rule; only the difference from what the ledger says was granted
becomes a grant. Reprocessing an event is therefore harmless, and reversals come from the
ledger, never from today's rules. Each scope's entry carries a version: changes are computed
from what was read and committed by one Lua call only if the version (and the unsent grants and
caps they depend on) is unchanged, so two workers handling two events of one order cannot both
add.

Grant states (each transition one atomic Redis step, written before the action it allows):

    pending ──claim──▶ claimed ──mark_sending──▶ sending ──▶ sent
       ▲ │                │                         ├──▶ failed   (Salla refused it, e.g. 422)
       └──release─────────┘ (retry, no token)       └──▶ unknown  (no answer: never resent)
    parked: waiting for the store's tokens (moved back to pending on app.store.authorize)
    netted: cancelled by an opposite change before it was sent (pending or parked only)

Keys (all under the `sr:` prefix):
    led:{merchant}:{scope}     hash  v (its version), event_at, customer, r:{rule} -> JSON
                                     {granted, deserved, customer, reason, channels, version,
                                     order, open: [unsent grant ids]}
    led-index:{m}:order:{id}   set   other scopes an order's events granted (for revocation)
    cap:{m}:{rule}:{c}:{day}   int   points a rule granted a customer on a local day
    grant:{id}                 hash  one grant (see `Grant`)
    pending:{merchant}         zset  grant ids by due time (ms)
    claimed:{merchant}         zset  grant ids by claim deadline (ms)
    parked:{merchant}          zset  grant ids waiting for tokens
    failed:{merchant}          zset  grant ids Salla refused, by time
    unknown:{merchant}         zset  grant ids whose call got no answer, by time
    stores:pending             set   merchants that may have pending grants
    gidx:{m}:scope:{scope}     zset  grant ids of a scope by creation time (admin views)
    gidx:{m}:customer:{c}      zset  grant ids of a customer by creation time (admin views)
    grant-log                  zset  every grant id by creation time (export); trimmed with
                                     the grant records, after SETTLED_GRANT_TTL_S
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from service import autopipe
from service.rules.engine import Outcome
from service.rules.model import MAX_POINTS_PER_CALL

GrantState = Literal[
    "pending", "claimed", "sending", "sent", "failed", "unknown", "parked", "netted", "review"
]

PREFIX = "sr:"
REVERSAL_PREFIX = "Reversal: "
STORES_PENDING = f"{PREFIX}stores:pending"
STORES_UNKNOWN = f"{PREFIX}stores:unknown"
GRANT_LOG = f"{PREFIX}grant-log"
#: How long the record of a settled (sent or netted) grant is kept. The ledger entries, which
#: reversals are computed from, are kept for good; this only bounds the per-grant history.
SETTLED_GRANT_TTL_S = 90 * 86400


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
    #: Sent alone: it was in a batch Salla refused (422) and bisection could not finish.
    isolate: bool = False
    #: "" for a normal grant; "select_all" gives the points to every customer of the store;
    #: "reset" resets the customer's points (Salla's reset flag) and carries no points;
    #: "reset_all" resets every customer's.
    mode: str = ""

    @property
    def group_key(self) -> tuple[str, int, str, tuple[str, ...], str]:
        """Grants with the same key can share one Salla call."""
        alone = self.isolate or self.mode in ("select_all", "reset_all")
        return (self.type, self.points, self.reason, self.channels, self.id if alone else self.mode)

    @property
    def signed_points(self) -> int:
        return self.points if self.type == "plus" else -self.points

    def to_redis(self) -> dict[str, str | int]:
        return {
            "id": self.id,
            "merchant": self.merchant,
            "customer": self.customer,
            "points": self.points,
            "type": self.type,
            "reason": self.reason,
            "channels": json.dumps(list(self.channels)),
            "scope": self.scope,
            "rule": self.rule,
            "state": self.state,
            "due_ms": self.due_ms,
            "created_ms": self.created_ms,
            "attempts": self.attempts,
            "batch": self.batch,
            "error": self.error,
            "trace_id": self.trace_id,
            "isolate": int(self.isolate),
            "mode": self.mode,
        }

    @classmethod
    def from_redis(cls, doc: dict[str, str]) -> Grant:
        grant_type: Literal["plus", "minus"] = "minus" if doc["type"] == "minus" else "plus"
        return cls(
            id=doc["id"],
            merchant=int(doc["merchant"]),
            customer=int(doc["customer"]),
            points=int(doc["points"]),
            type=grant_type,
            reason=doc["reason"],
            channels=tuple(json.loads(doc["channels"])),
            scope=doc["scope"],
            rule=doc["rule"],
            state=doc["state"],  # type: ignore[arg-type]
            due_ms=int(doc.get("due_ms", 0)),
            created_ms=int(doc.get("created_ms", 0)),
            attempts=int(doc.get("attempts", 0)),
            batch=doc.get("batch", ""),
            error=doc.get("error", ""),
            trace_id=doc.get("trace_id", ""),
            isolate=doc.get("isolate", "0") == "1",
            mode=doc.get("mode", ""),
        )


def _split(points: int) -> list[int]:
    """Salla takes at most 999,999 points per call: larger deltas become several grants."""
    parts = [MAX_POINTS_PER_CALL] * (points // MAX_POINTS_PER_CALL)
    if points % MAX_POINTS_PER_CALL:
        parts.append(points % MAX_POINTS_PER_CALL)
    return parts


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def scope_grants_key(merchant: int, scope: str) -> str:
    return f"{PREFIX}gidx:{merchant}:scope:{scope}"


def customer_grants_key(merchant: int, customer: int) -> str:
    return f"{PREFIX}gidx:{merchant}:customer:{customer}"


@dataclass(frozen=True, slots=True)
class Diff:
    """What one event changed (or, in a dry run, would change) for one rule in one scope."""

    merchant: int
    scope: str
    rule: str
    customer: int
    granted_before: int
    granted_after: int
    new_grants: int
    netted_grants: int

    @property
    def delta(self) -> int:
        return self.granted_after - self.granted_before


def order_index_key(merchant: int, order_id: int) -> str:
    """Scopes other than `order:<id>` that were granted because of this order."""
    return f"{PREFIX}led-index:{merchant}:order:{order_id}"


def cap_key(merchant: int, rule: str, customer: int, day: str) -> str:
    return f"{PREFIX}cap:{merchant}:{rule}:{customer}:{day}"


NETTABLE_STATES = frozenset({"pending", "parked"})
OPEN_STATES = frozenset({"pending", "parked", "claimed", "sending"})


#: Returned by `apply_outcomes` when a newer event of the order was already applied.
STALE: list[Grant] = []


async def apply_outcomes(
    redis: Redis,
    merchant: int,
    outcomes: Sequence[Outcome],
    *,
    customer: int,
    order_id: int = 0,
    revoke_order: bool = False,
    trace_id: str = "",
    event_at: float | None = None,
    dry_run: bool = False,
    diffs: list[Diff] | None = None,
) -> list[Grant]:
    """Bring each scope's ledger entry to what `outcomes` say it deserves; return new grants.

    `revoke_order` sets every rule recorded for the order to 0 (including rules that no longer
    exist, and once-per-customer bonuses this order earned): reversals come from the ledger.
    `event_at` (the event's time) orders the events of one order: the order's entry remembers
    the newest applied, and an older one changes nothing and returns `STALE`.
    `diffs`, when given, receives one `Diff` per changed rule; `dry_run` computes everything
    and writes nothing (the returned grants are what would have been queued).
    """
    by_scope: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome.changes_ledger and outcome.scope:
            by_scope.setdefault(outcome.scope, []).append(outcome)
    revoke_scopes: set[str] = set()
    if revoke_order and order_id:
        revoke_scopes = {f"order:{order_id}"} | set(
            await redis.smembers(order_index_key(merchant, order_id))  # type: ignore[misc]
        )
    order_scope = f"order:{order_id}" if order_id else ""
    scopes = sorted(set(by_scope) | revoke_scopes | ({order_scope} if event_at else set()))
    if order_scope in scopes:  # the order's entry first: it decides whether the event is stale
        scopes.remove(order_scope)
        scopes.insert(0, order_scope)
    grants: list[Grant] = []
    for scope in scopes:
        made = await _apply_scope(
            redis,
            merchant,
            scope,
            by_scope.get(scope, []),
            customer=customer,
            order_id=order_id,
            revoke=scope in revoke_scopes,
            trace_id=trace_id,
            event_at=event_at if scope == order_scope else None,
            dry_run=dry_run,
            diffs=diffs,
        )
        if made is STALE:
            return STALE
        grants += made
    return grants


@dataclass
class _Change:
    """One rule's new state in one scope, computed under WATCH."""

    rule: str
    record: dict[str, Any]
    netted: list[str] = field(default_factory=list)
    new: list[Grant] = field(default_factory=list)
    cap_used: tuple[str, int] | None = None


# ARGV[1]: JSON {"checks": [[key, hash field or "", expected value or ""], ...],
# "writes": [[command, arguments...], ...]}. The writes happen only if every checked value is
# still what the caller read (a missing key reads as ""); else nothing is written and 0 is
# returned, and the caller reads again. Optimistic concurrency in one round trip, where
# WATCH/MULTI/EXEC took three; one JSON argument, because packing each argument of a command
# is a large share of the client's CPU per event.
_COMMIT = """
local commit = cjson.decode(ARGV[1])
for _, check in ipairs(commit.checks) do
  local have
  if check[2] == '' then
    have = redis.call('GET', check[1])
  else
    have = redis.call('HGET', check[1], check[2])
  end
  if (have or '') ~= check[3] then return 0 end
end
for _, write in ipairs(commit.writes) do
  redis.call(unpack(write))
end
return 1
"""


class _Writes:
    """The writes of one commit, in `_COMMIT`'s argument form (the pipeline verbs `_write`
    uses). `check` records a value the writes depend on."""

    def __init__(self) -> None:
        self.checks: list[tuple[str, str, str]] = []
        self.writes: list[list[str]] = []

    def check(self, key: str, field: str, expected: str | None) -> None:
        self.checks.append((key, field, expected or ""))

    def _op(self, command: str, *args: object) -> None:
        self.writes.append([command, *map(str, args)])

    def hset(self, key: str, field: str = "", value: object = "", *, mapping: Any = None) -> None:
        pairs = [field, value] if field else []
        for name, item in (mapping or {}).items():
            pairs += [name, item]
        self._op("HSET", key, *pairs)

    def hsetnx(self, key: str, field: str, value: str) -> None:
        self._op("HSETNX", key, field, value)

    def expire(self, key: str, seconds: int) -> None:
        self._op("EXPIRE", key, seconds)

    def zadd(self, key: str, members: dict[str, int]) -> None:
        self._op("ZADD", key, *(x for member, score in members.items() for x in (score, member)))

    def zrem(self, key: str, member: str) -> None:
        self._op("ZREM", key, member)

    def zremrangebyscore(self, key: str, low: str, high: int) -> None:
        self._op("ZREMRANGEBYSCORE", key, low, high)

    def incrby(self, key: str, amount: int) -> None:
        self._op("INCRBY", key, amount)

    def sadd(self, key: str, member: str) -> None:
        self._op("SADD", key, member)

    def encoded(self) -> bytes:
        return orjson.dumps({"checks": self.checks, "writes": self.writes})


async def _apply_scope(
    redis: Redis,
    merchant: int,
    scope: str,
    outcomes: Sequence[Outcome],
    *,
    customer: int,
    order_id: int,
    revoke: bool,
    trace_id: str,
    event_at: float | None = None,
    dry_run: bool = False,
    diffs: list[Diff] | None = None,
) -> list[Grant]:
    """Read the scope's entry, compute the changes, commit them if nothing they were computed
    from changed meanwhile (the entry's version, the states of its unsent grants, the caps);
    otherwise read again. Two events of one scope can therefore never both add."""
    key = entry_key(merchant, scope)
    while True:
        # Read and commit through the client's auto-pipeline: a worker's concurrent events share
        # round trips.
        raw: dict[str, str] = await autopipe.auto(redis).execute("HGETALL", key)
        newest = float(raw.get("event_at", "-inf"))
        if event_at is not None and event_at < newest:
            return STALE
        records = {n[2:]: json.loads(v) for n, v in raw.items() if n.startswith("r:")}
        targets = {o.rule_id: o for o in outcomes}
        if revoke:
            for rule, record in records.items():
                if scope.startswith("order:") or record.get("order") == order_id:
                    targets[rule] = _revocation(rule)
        open_ids = [g for r in targets for g in records.get(r, {}).get("open", [])]
        cap_keys = {
            r: cap_key(merchant, r, customer, o.day)
            for r, o in targets.items()
            if o.cap_per_customer_per_day is not None and o.deserved != 0
        }
        states, state_seen = await _open_grants(redis, open_ids)
        cap_raw = (
            dict(zip(cap_keys, await redis.mget(list(cap_keys.values())), strict=True))
            if cap_keys
            else {}
        )
        caps_used = {r: int(v or 0) for r, v in cap_raw.items()}
        now = now_ms()
        changes = [
            change
            for rule, outcome in targets.items()
            if (
                change := _change(
                    merchant,
                    scope,
                    rule,
                    outcome,
                    records.get(rule, {}),
                    states,
                    caps_used.get(rule),
                    cap_keys.get(rule),
                    customer,
                    order_id,
                    trace_id,
                    now,
                )
            )
            is not None
        ]
        bump = event_at is not None and event_at > newest
        if dry_run or (not changes and not bump):
            _report(diffs, merchant, scope, records, changes)
            return [g for c in changes for g in c.new]
        writes = _Writes()
        writes.check(key, "v", raw.get("v"))
        for grant_id in open_ids:
            writes.check(grant_key(grant_id), "state", state_seen.get(grant_id))
        for rule, name in cap_keys.items():
            writes.check(name, "", cap_raw.get(rule))
        writes.hset(key, "v", str(int(raw.get("v", "0")) + 1))
        if bump:
            writes.hset(key, "event_at", repr(event_at))
        if changes:
            _write(writes, merchant, scope, key, changes, customer, order_id)
        if await _commit(redis, writes):
            _report(diffs, merchant, scope, records, changes)
            return [g for c in changes for g in c.new]


async def _commit(redis: Redis, writes: _Writes) -> bool:
    return bool(await autopipe.auto(redis).execute("EVAL", _COMMIT, 0, writes.encoded()))


def _report(
    diffs: list[Diff] | None,
    merchant: int,
    scope: str,
    records: dict[str, dict[str, Any]],
    changes: Sequence[_Change],
) -> None:
    if diffs is None:
        return
    for change in changes:
        before = int(records.get(change.rule, {}).get("granted", 0))
        after = int(change.record["granted"])
        if before == after and not change.new and not change.netted:
            continue
        diffs.append(
            Diff(
                merchant=merchant,
                scope=scope,
                rule=change.rule,
                customer=int(change.record.get("customer", 0)),
                granted_before=before,
                granted_after=after,
                new_grants=len(change.new),
                netted_grants=len(change.netted),
            )
        )


def _revocation(rule: str) -> Outcome:
    return Outcome(rule, "", "revoke", 0, "", (), "the order was revoked")


async def _open_grants(
    redis: Redis, ids: Sequence[str]
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The unsent grants' fields `_change` reads, and each one's state as read (for the
    commit's check; a missing grant reads as "")."""
    if not ids:
        return {}, {}
    fields = ("state", "points", "type", "due_ms")
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hmget(grant_key(grant_id), list(fields))
        rows = await pipe.execute()
    states = {
        grant_id: dict(zip(fields, values, strict=True))
        for grant_id, values in zip(ids, rows, strict=True)
        if values[0] is not None
    }
    return states, {grant_id: values[0] or "" for grant_id, values in zip(ids, rows, strict=True)}


def _change(
    merchant: int,
    scope: str,
    rule: str,
    outcome: Outcome,
    record: dict[str, Any],
    states: dict[str, dict[str, str]],
    cap_used: int | None,
    cap_name: str | None,
    customer: int,
    order_id: int,
    trace_id: str,
    now: int,
) -> _Change | None:
    granted = int(record.get("granted", 0))
    deserved = int(record.get("deserved", granted))
    target = outcome.deserved
    if target == deserved and outcome.verdict == "grant":
        return None
    if target == 0 and granted == 0:
        return None
    sign = _sign(target)
    cap = outcome.cap_per_customer_per_day
    cap_taken = 0
    if target == 0:
        new_granted = 0
    elif deserved == 0 or _sign(deserved) != sign or abs(target) > abs(deserved):
        base = 0 if _sign(deserved) not in (0, sign) else abs(deserved)
        increase = abs(target) - base
        allowed = increase if cap is None else max(0, min(increase, cap - (cap_used or 0)))
        cap_taken = allowed
        start = 0 if _sign(granted) not in (0, sign) else abs(granted)
        new_granted = sign * (start + allowed)
    else:
        new_granted = sign * max(0, abs(granted) - (abs(deserved) - abs(target)))
    delta = new_granted - granted
    customer = int(record.get("customer", customer)) or customer
    open_ids = [g for g in record.get("open", []) if states.get(g, {}).get("state") in OPEN_STATES]
    change = _Change(rule, {})
    remaining = delta
    kept_due = 0
    # Opposite grants that are still unsent cancel out before anything new is sent.
    for grant_id in reversed(list(open_ids)):
        if remaining == 0:
            break
        state = states[grant_id]
        signed = int(state["points"]) * (1 if state["type"] == "plus" else -1)
        if state["state"] not in NETTABLE_STATES or _sign(signed) == _sign(remaining):
            continue
        change.netted.append(grant_id)
        open_ids.remove(grant_id)
        kept_due = max(kept_due, int(state["due_ms"] or 0))
        remaining += signed
        if _sign(remaining) == _sign(signed):  # over-cancelled: re-grant the difference
            break
    if remaining:
        if outcome.verdict == "grant" and outcome.deserved != 0:
            reason, channels = outcome.reason, outcome.channels
        else:  # taken back: say so, with the reason the points were given for
            reason = REVERSAL_PREFIX + str(record.get("reason", rule))
            channels = tuple(record.get("channels", ()))
        # Plus grants wait out the hold (or keep the hold of what they replace); minus go now.
        due = (kept_due or now + outcome.hold_s * 1000) if remaining > 0 else now
        for part in _split(abs(remaining)):
            grant = Grant(
                id=uuid.uuid4().hex,
                merchant=merchant,
                customer=customer,
                points=part,
                type="plus" if remaining > 0 else "minus",
                reason=reason,
                channels=channels,
                scope=scope,
                rule=rule,
                due_ms=due,
                created_ms=now,
                trace_id=trace_id,
                mode=outcome.mode,
            )
            change.new.append(grant)
            open_ids.append(grant.id)
    granting = outcome.verdict == "grant" and outcome.deserved != 0
    change.record = {
        "granted": new_granted,
        "deserved": target,
        "customer": customer,
        "reason": outcome.reason if granting else record.get("reason", ""),
        "channels": list(outcome.channels if granting else record.get("channels", [])),
        "version": outcome.rule_version or record.get("version", ""),
        "order": order_id or record.get("order", 0),
        "open": open_ids,
    }
    if cap_taken and cap_name:
        change.cap_used = (cap_name, cap_taken)
    return change


def _write(
    writes: _Writes,
    merchant: int,
    scope: str,
    key: str,
    changes: Sequence[_Change],
    customer: int,
    order_id: int,
) -> None:
    for change in changes:
        writes.hset(key, f"r:{change.rule}", json.dumps(change.record, ensure_ascii=False))
        for grant_id in change.netted:
            writes.hset(grant_key(grant_id), mapping={"state": "netted", "error": ""})
            writes.expire(grant_key(grant_id), SETTLED_GRANT_TTL_S)
            writes.zrem(_key("pending", merchant), grant_id)
            writes.zrem(_key("parked", merchant), grant_id)
        for grant in change.new:
            writes.hset(grant_key(grant.id), mapping=grant.to_redis())
            writes.zadd(_key("pending", merchant), {grant.id: grant.due_ms})
            _index(writes, grant)
        if change.cap_used:
            name, amount = change.cap_used
            writes.incrby(name, amount)
            writes.expire(name, 3 * 86400)
    if customer:
        writes.hsetnx(key, "customer", str(customer))
    if order_id and not scope.startswith("order:"):
        writes.sadd(order_index_key(merchant, order_id), scope)
    writes.sadd(STORES_PENDING, str(merchant))


def _index(writes: _Writes, grant: Grant) -> None:
    """Admin lookups: a grant by its scope, its customer and its time. Kept as long as grants."""
    for name in (
        scope_grants_key(grant.merchant, grant.scope),
        customer_grants_key(grant.merchant, grant.customer),
    ):
        writes.zadd(name, {grant.id: grant.created_ms})
        writes.expire(name, SETTLED_GRANT_TTL_S)
    writes.zadd(GRANT_LOG, {grant.id: grant.created_ms})
    writes.zremrangebyscore(GRANT_LOG, "-inf", grant.created_ms - SETTLED_GRANT_TTL_S * 1000)


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
  redis.call('HSET', ARGV[4] .. id, 'state', 'claimed', 'claim', ARGV[5])
end
return ids
"""


async def claim_due(
    redis: Redis, merchant: int, *, limit: int, claim_timeout_ms: int, token: str = ""
) -> list[Grant]:
    """Atomically move up to `limit` due grants from pending to claimed by `token`; load them."""
    now = now_ms()
    ids: list[str] = await redis.eval(  # type: ignore[misc]
        _CLAIM,
        2,
        _key("pending", merchant),
        _key("claimed", merchant),
        str(now),
        str(limit),
        str(now + claim_timeout_ms),
        f"{PREFIX}grant:",
        token,
    )
    return await load(redis, ids)


async def extend_claims(
    redis: Redis, merchant: int, grants: Sequence[Grant], timeout_ms: int
) -> None:
    """A live flush's heartbeat: its claims stay its own while it keeps working."""
    if grants:
        await redis.zadd(
            _key("claimed", merchant), {g.id: now_ms() + timeout_ms for g in grants}, xx=True
        )


async def load(redis: Redis, ids: Sequence[str]) -> list[Grant]:
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hgetall(grant_key(grant_id))
        docs: list[dict[str, str]] = await pipe.execute()
    return [Grant.from_redis(doc) for doc in docs if doc]


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
        _key("claimed", merchant),
        f"{PREFIX}grant:",
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
            pipe.hset(grant_key(grant.id), mapping={"state": "claimed", "batch": ""})
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
            if state == "sent":
                pipe.expire(grant_key(grant.id), SETTLED_GRANT_TTL_S)
            else:
                pipe.zadd(_key(state, merchant), {grant.id: at})
        if state == "unknown":
            pipe.sadd(STORES_UNKNOWN, str(merchant))
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
            pipe.hset(grant_key(grant.id), mapping=fields)
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
        _UNPARK,
        3,
        _key("parked", merchant),
        _key("pending", merchant),
        STORES_PENDING,
        str(now_ms()),
        f"{PREFIX}grant:",
        str(merchant),
    )
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
if unknown > 0 then redis.call('SADD', KEYS[4], ARGV[3]) end
return {returned, unknown}
"""


async def sweep_claims(redis: Redis, merchant: int) -> tuple[int, int]:
    """Recover work of dead workers: claimed → pending; sending → unknown (never resent blindly)."""
    returned, unknown = await redis.eval(  # type: ignore[misc]
        _SWEEP,
        4,
        _key("claimed", merchant),
        _key("pending", merchant),
        _key("unknown", merchant),
        STORES_UNKNOWN,
        str(now_ms()),
        f"{PREFIX}grant:",
        str(merchant),
    )
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
            pipe.zrem(_key("unknown", merchant), grant.id)
            fields: dict[str, str | int] = {"state": outcome, "error": note}
            if outcome == "pending":
                fields["due_ms"] = at
                pipe.zadd(_key("pending", merchant), {grant.id: at})
            elif outcome == "review":
                pipe.zadd(_key("review", merchant), {grant.id: at})
            else:
                fields["done_ms"] = at
            pipe.hset(grant_key(grant.id), mapping=fields)
            if outcome == "sent":
                pipe.expire(grant_key(grant.id), SETTLED_GRANT_TTL_S)
        if outcome == "pending":
            pipe.sadd(STORES_PENDING, str(merchant))
        await pipe.execute()


async def unknown_since(redis: Redis, merchant: int, before_ms: int) -> list[Grant]:
    """Unknown-outcome grants that have waited since before `before_ms`."""
    ids: list[str] = await redis.zrangebyscore(_key("unknown", merchant), "-inf", before_ms)
    return await load(redis, ids)


async def stores_with_unknown(redis: Redis) -> list[int]:
    return [int(m) for m in await redis.smembers(STORES_UNKNOWN)]  # type: ignore[misc]


async def count_reconcile_attempt(redis: Redis, grant: Grant) -> int:
    return int(await redis.hincrby(grant_key(grant.id), "reconcile_attempts", 1))  # type: ignore[misc]


async def forget_unknown_store_if_empty(redis: Redis, merchant: int) -> None:
    if not await redis.zcard(_key("unknown", merchant)):
        await redis.srem(STORES_UNKNOWN, str(merchant))  # type: ignore[misc]


async def requeue(redis: Redis, merchant: int, grant: Grant, from_kind: str) -> bool:
    """Put one failed/review/unknown/parked grant back to pending, due now (an operator's call).

    Atomic per grant, so an interrupted bulk retry leaves every grant in one state or the other.
    """
    async with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(_key(from_kind, merchant), grant.id)
        pipe.hset(
            grant_key(grant.id), mapping={"state": "pending", "due_ms": now_ms(), "error": ""}
        )
        pipe.zadd(_key("pending", merchant), {grant.id: now_ms()})
        pipe.sadd(STORES_PENDING, str(merchant))
        removed, *_ = await pipe.execute()
    return bool(removed)


async def stores_with(redis: Redis, kind: str) -> list[int]:
    """Merchants that have grants listed under `kind` (failed, review, unknown, parked...)."""
    merchants = set()
    async for key in redis.scan_iter(f"{PREFIX}{kind}:*"):
        suffix = key.rsplit(":", 1)[-1]
        if suffix.isdigit():
            merchants.add(int(suffix))
    return sorted(merchants)


async def store_gauges(redis: Redis, merchant: int) -> dict[str, float]:
    """Queue depth, age of the oldest due grant, and grants needing attention, for one store."""
    now = now_ms()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(_key("pending", merchant))
        pipe.zrangebyscore(_key("pending", merchant), "-inf", now, start=0, num=1, withscores=True)
        for kind in ("failed", "review", "parked"):
            pipe.zcard(_key(kind, merchant))
        pending, oldest, failed, review, parked = await pipe.execute()
    return {
        "pending": pending,
        "oldest_age_s": (now - oldest[0][1]) / 1000 if oldest else 0.0,
        "failed": failed,
        "review": review,
        "parked": parked,
    }
