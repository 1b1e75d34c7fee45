"""The ledger: what each (store, scope, rule) was granted, and every grant's state. Redis.

What a scope deserves is decided by the pure order-state core (service/order_state.py): per
rule and order, the newest decisive verdict wins, and only the difference from what was granted
becomes a grant. This module is the read / decide / commit loop around it: `apply_event` reads
every entry one event touches, lets the core decide, and commits all of it with one Lua call
that writes only if each entry's version (and the unsent grants and caps it depends on) is
still what was read; otherwise it reads and decides again. Reversals come from the ledger,
never from today's rules.

Grant states (each transition one atomic Redis step, written before the action it allows):

    pending ──claim──▶ claimed ──mark_sending──▶ sending ──▶ sent
       ▲ │                │                         ├──▶ failed   (Salla refused it, e.g. 422)
       └──release─────────┘ (retry, no token)       └──▶ unknown  (no answer: never resent)
    parked: waiting for the store's tokens (moved back to pending on app.store.authorize)
    verifying: held for a return window and due; the order is being confirmed with Salla
               (service/orders/truth.py) before the grant goes back to pending
    netted: cancelled by an opposite change before it was sent (pending, parked, verifying)

Keys (all under the `sr:` prefix):
    led:{merchant}:{scope}     hash  v (its version), r:{rule} -> a `RuleRecord` (JSON: the
                                     newest decisive verdict per order, granted and deserved
                                     per customer, unsent grant ids); the order's own entry
                                     (scope order:{id}) also holds its `OrderFacts`
    led-index:{m}:order:{id}   set   other scopes an order's events granted (for revocation)
    cap:{m}:{rule}:{c}:{day}   int   points a rule granted a customer on a local day
    grant:{id}                 hash  one grant (see `Grant`)
    pending:{merchant}         zset  grant ids by due time (ms)
    verifying:{merchant}       zset  held grants being confirmed, by when to ask again (ms)
    claimed:{merchant}         zset  grant ids by claim deadline (ms)
    parked:{merchant}          zset  grant ids waiting for tokens
    failed:{merchant}          zset  grant ids Salla refused, by time
    unknown:{merchant}         zset  grant ids whose call got no answer, by time
    stores:pending             set   merchants that may have pending grants
    gidx:{m}:scope:{scope}     zset  grant ids of a scope by creation time (admin views)
    gidx:{m}:customer:{c}      zset  grant ids of a customer by creation time (admin views)
    grant-log                  zset  every grant id by creation time (export); trimmed with
                                     the grant records, after SETTLED_GRANT_TTL_S
Elsewhere: rl:{m} and rl-plan:{m} (the customers and plan buckets, delivery/ratelimit.py),
orders-rec:{m} (a reconciliation's place) and orders-rec-slot:{m} (its period), store:{m}
(tokens, install time, `order_truth_unavailable`: tokens.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from service import autopipe, order_state
from service.order_state import (
    EventKey,
    EventVerdicts,
    OpenGrant,
    OrderFacts,
    RuleRecord,
    ScopedVerdict,
    Verdict,
)
from service.rules.engine import Outcome

GrantState = Literal[
    "pending",
    "verifying",
    "claimed",
    "sending",
    "sent",
    "failed",
    "unknown",
    "parked",
    "netted",
    "review",
]

PREFIX = "sr:"
REVERSAL_PREFIX = order_state.REVERSAL_PREFIX
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
    #: The order the grant is for (0: none).
    order: int = 0
    #: Held for a return window: confirmed against Salla's order before it is released.
    held: bool = False

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
            "channels": orjson.dumps(self.channels).decode(),
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
            "order": self.order,
            "held": int(self.held),
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
            channels=tuple(orjson.loads(doc["channels"])),
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
            order=int(doc.get("order", 0) or 0),
            held=doc.get("held", "0") == "1",
        )


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


NETTABLE_STATES = order_state.NETTABLE_STATES
OPEN_STATES = order_state.OPEN_STATES


@dataclass
class Applied:
    """What applying one event did."""

    grants: list[Grant] = field(default_factory=list)
    #: Only Salla's orders API can say what the order deserves (an ambiguous tie, or an order
    #: seen completed only after a newer event was judged without knowing it).
    ask_salla: bool = False
    #: The order's entry changed since `expect_version` (the caller reads and decides again).
    conflict: bool = False
    #: Something was written (False: a re-sent event, or one older than what decided every
    #: rule it touched).
    changed: bool = False


@dataclass(frozen=True, slots=True)
class OrderRead:
    """The order's entry as read: its facts and its version."""

    facts: OrderFacts
    version: str
    raw: Mapping[str, str]


async def read_order(redis: Redis, merchant: int, order_id: int) -> OrderRead:
    raw = await autopipe.auto(redis).execute("HGETALL", entry_key(merchant, f"order:{order_id}"))
    return OrderRead(OrderFacts.from_fields(raw), raw.get("v", ""), raw)


async def apply_event(
    redis: Redis,
    merchant: int,
    order_id: int,
    judge: Callable[[OrderFacts], EventVerdicts],
    *,
    trace_id: str = "",
    skew_s: int = 10,
    expect_version: str | None = None,
    dry_run: bool = False,
    diffs: list[Diff] | None = None,
) -> Applied:
    """Apply one event to every scope it touches, in one atomic commit.

    `judge(facts)` evaluates the event's rules knowing the order's facts (whether it was ever
    seen completed); it runs again whenever the commit finds that something it read changed
    meanwhile. Every scope (the order, its customers' bonuses, the order's index) commits in
    one script guarded by each entry's version, so two workers cannot interleave between them.
    `expect_version`: commit only if the order's entry is still at that version (a state
    fetched from Salla must not overwrite events applied while it was asked for).
    """
    while True:
        read = await read_order(redis, merchant, order_id) if order_id else None
        if expect_version is not None and read is not None and read.version != expect_version:
            return Applied(conflict=True)
        event = judge(read.facts if read else OrderFacts())
        result = await _apply_once(
            redis, merchant, order_id, event, read, trace_id, skew_s, dry_run, diffs
        )
        if result is not None:
            return result


async def _apply_once(
    redis: Redis,
    merchant: int,
    order_id: int,
    event: EventVerdicts,
    read: OrderRead | None,
    trace_id: str,
    skew_s: int,
    dry_run: bool,
    diffs: list[Diff] | None,
) -> Applied | None:
    """One read-decide-commit round; None when something read changed before the commit."""
    order_scope = f"order:{order_id}" if order_id else ""
    pipe = autopipe.auto(redis)
    linked: set[str] = set()
    if event.revoke and order_id:  # the scopes the order granted elsewhere go back too
        # Read after the order's entry: a scope linked since changed its version, which the
        # commit checks.
        linked = await pipe.execute("SMEMBERS", order_index_key(merchant, order_id))
    names = sorted(order_state.scopes_of(event, order_id, linked, read.facts if read else None))
    others = [s for s in names if read is None or s != order_scope]  # the order's is read
    # Futures of one auto-pipeline: queued together, awaited in turn (no gather: most events
    # read nothing more).
    pending = [pipe.execute("HGETALL", entry_key(merchant, s)) for s in others]
    entries: dict[str, Mapping[str, str]] = {
        s: await f for s, f in zip(others, pending, strict=True)
    }
    if read is not None:
        entries[order_scope] = read.raw
    records = {
        scope: {n[2:]: RuleRecord.decode(v) for n, v in raw.items() if n[:2] == "r:"}
        for scope, raw in entries.items()
    }
    decided = order_state.decide_event(
        records, read.facts if read else None, event, order_id, skew_s
    )
    ask, moved, before = decided.ask_salla, decided.moved, decided.before
    open_ids = [g for r in moved.values() for g in r.open]
    states, state_seen = await _open_grants(redis, open_ids) if open_ids else ({}, {})
    caps: dict[tuple[str, str], tuple[str, int]] = {}
    cap_raw: dict[str, str | None] = {}
    holders = {at: order_state.holder(record) for at, record in moved.items()}
    for (scope, rule), capped in holders.items():
        if capped is not None and capped.cap is not None:
            caps[(scope, rule)] = (cap_key(merchant, rule, capped.customer, capped.day), 0)
    if caps:
        names_cap = sorted({name for name, _ in caps.values()})
        values = await redis.mget(names_cap)
        cap_raw = dict(zip(names_cap, values, strict=True))
    now = now_ms()
    settlements: dict[tuple[str, str], order_state.Settlement] = {}
    for (scope, rule), record in moved.items():
        holder = holders[(scope, rule)]
        used = {}
        if (scope, rule) in caps and holder is not None:
            used = {holder.customer: int(cap_raw.get(caps[(scope, rule)][0]) or 0)}
        settlements[(scope, rule)] = order_state.settle(
            rule, record, states, cap_used=used, now_ms=now, new_id=_new_grant_id
        )
    facts_changed = read is not None and decided.facts != read.facts
    new_grants = [
        _grant(merchant, scope, rule, g, trace_id)
        for (scope, rule), s in settlements.items()
        for g in s.new
    ]
    if dry_run or (not moved and not facts_changed):
        _report(diffs, merchant, before, settlements)
        return Applied(new_grants, ask_salla=ask)
    writes = _Writes()
    # The order's version (as the judge read its facts) guards every scope of the commit.
    for scope in {s for s, _ in moved} | ({order_scope} if order_scope else set()):
        writes.check(entry_key(merchant, scope), "v", entries[scope].get("v"))
        writes.hset(entry_key(merchant, scope), "v", str(int(entries[scope].get("v") or 0) + 1))
    for grant_id in open_ids:
        writes.check(grant_key(grant_id), "state", state_seen.get(grant_id))
    for name, value in cap_raw.items():
        writes.check(name, "", value)
    if facts_changed and decided.facts is not None:
        writes.hset(entry_key(merchant, order_scope), mapping=decided.facts.to_fields())
    for (scope, rule), settlement in settlements.items():
        _write(writes, merchant, scope, rule, settlement, caps.get((scope, rule)), order_id)
    if new_grants or any(s.netted for s in settlements.values()):
        writes.sadd(STORES_PENDING, str(merchant))
    for grant in new_grants:
        writes.hset(grant_key(grant.id), mapping=grant.to_redis())
        writes.zadd(_key("pending", merchant), {grant.id: grant.due_ms})
        _index(writes, grant)
    if not await _commit(redis, writes):
        return None
    _report(diffs, merchant, before, settlements)
    return Applied(new_grants, ask_salla=ask, changed=True)


def _new_grant_id() -> str:
    # The 32 random hex digits of a uuid4 without building the UUID (a share of each event).
    return os.urandom(16).hex()


def _grant(merchant: int, scope: str, rule: str, new: order_state.NewGrant, trace_id: str) -> Grant:
    return Grant(
        id=new.id,
        merchant=merchant,
        customer=new.customer,
        points=abs(new.signed_points),
        type="plus" if new.signed_points > 0 else "minus",
        reason=new.reason,
        channels=new.channels,
        scope=scope,
        rule=rule,
        due_ms=new.due_ms,
        created_ms=now_ms(),
        trace_id=trace_id,
        mode=new.mode,
        order=new.order,
        held=new.held,
    )


async def apply_outcomes(
    redis: Redis,
    merchant: int,
    outcomes: Sequence[Outcome],
    *,
    customer: int,
    order_id: int = 0,
    revoke_order: bool = False,
    trace_id: str = "",
    dry_run: bool = False,
    diffs: list[Diff] | None = None,
) -> list[Grant]:
    """Apply rule outcomes that carry no order key (campaigns, tools, events outside orders):
    the one applied last stands for each rule. Order events go through `apply_event`."""
    event = EventVerdicts(
        [
            ScopedVerdict(o.scope, o.rule_id, verdict_of(o, None, order_id, customer))
            for o in outcomes
            if o.changes_ledger and o.scope
        ],
        revoke=revoke_order,
    )
    applied = await apply_event(
        redis,
        merchant,
        order_id,
        lambda _facts: event,
        trace_id=trace_id,
        dry_run=dry_run,
        diffs=diffs,
    )
    return applied.grants


def verdict_of(
    outcome: Outcome, key: EventKey | None, order_id: int, customer: int, since_ms: int = 0
) -> Verdict:
    """A decisive rule outcome (grant or revoke) as the order-state core's verdict."""
    return Verdict(
        key=key,
        order=order_id,
        customer=customer,
        points=outcome.deserved if outcome.verdict == "grant" else 0,
        reason=outcome.reason,
        channels=outcome.channels,
        version=outcome.rule_version,
        hold_s=outcome.hold_s,
        since_ms=since_ms,
        mode=outcome.mode,
        day=outcome.day,
        cap=outcome.cap_per_customer_per_day,
    )


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
    """The writes of one commit, in `_COMMIT`'s argument form. `check` records a value the
    writes depend on."""

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


async def _commit(redis: Redis, writes: _Writes) -> bool:
    return bool(await autopipe.auto(redis).execute("EVAL", _COMMIT, 0, writes.encoded()))


def _write(
    writes: _Writes,
    merchant: int,
    scope: str,
    rule: str,
    settlement: order_state.Settlement,
    cap: tuple[str, int] | None,
    order_id: int,
) -> None:
    key = entry_key(merchant, scope)
    writes.hset(key, f"r:{rule}", settlement.record.encoded())
    for grant_id in settlement.netted:
        writes.hset(grant_key(grant_id), mapping={"state": "netted", "error": ""})
        writes.expire(grant_key(grant_id), SETTLED_GRANT_TTL_S)
        for kind in ("pending", "parked", "verifying"):
            writes.zrem(_key(kind, merchant), grant_id)
    if cap is not None:
        for amount in settlement.cap_taken.values():
            writes.incrby(cap[0], amount)
            writes.expire(cap[0], 3 * 86400)
    if order_id and scope != f"order:{order_id}":
        writes.sadd(order_index_key(merchant, order_id), scope)


def _report(
    diffs: list[Diff] | None,
    merchant: int,
    before: Mapping[tuple[str, str], RuleRecord],
    settlements: dict[tuple[str, str], order_state.Settlement],
) -> None:
    if diffs is None:
        return
    for (scope, rule), settlement in settlements.items():
        was = before[(scope, rule)].granted_total
        after = settlement.record.granted_total
        if was == after and not settlement.changed:
            continue
        customers = settlement.record.granted or before[(scope, rule)].granted
        diffs.append(
            Diff(
                merchant=merchant,
                scope=scope,
                rule=rule,
                customer=next(iter(customers), 0),
                granted_before=was,
                granted_after=after,
                new_grants=len(settlement.new),
                netted_grants=len(settlement.netted),
            )
        )


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


async def _open_grants(
    redis: Redis, ids: Sequence[str]
) -> tuple[dict[str, OpenGrant], dict[str, str]]:
    """The unsent grants as settling reads them, and each one's state as read (for the
    commit's check; a missing grant reads as "")."""
    if not ids:
        return {}, {}
    fields = ["state", "points", "type", "due_ms", "customer"]
    pipe = autopipe.auto(redis)
    queued = [pipe.execute("HMGET", grant_key(g), *fields) for g in ids]
    rows = [await row for row in queued]
    grants = {
        grant_id: OpenGrant(
            grant_id,
            int(customer or 0),
            int(points) * (1 if kind == "plus" else -1),
            state,
            int(due or 0),
        )
        for grant_id, (state, points, kind, due, customer) in zip(ids, rows, strict=True)
        if state is not None
    }
    return grants, {g: (row[0] or "") for g, row in zip(ids, rows, strict=True)}


async def entry(redis: Redis, merchant: int, scope: str) -> dict[str, int]:
    """What the ledger says `scope` was granted, per rule (signed points, all customers)."""
    raw: dict[str, str] = await redis.hgetall(entry_key(merchant, scope))  # type: ignore[misc]
    return {
        name[2:]: RuleRecord.decode(value).granted_total
        for name, value in raw.items()
        if name.startswith("r:")
    }


# --- grant state transitions -------------------------------------------------------------

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
    ids, orders = await redis.eval(  # type: ignore[misc]
        _CLAIM,
        3,
        _key("pending", merchant),
        _key("claimed", merchant),
        _key("verifying", merchant),
        str(now),
        str(limit),
        str(now + claim_timeout_ms),
        f"{PREFIX}grant:",
        token,
        "1" if verify_held else "0",
        str(now + VERIFY_RETRY_MS),
    )
    verify = {int(o) for o in orders if str(o).isdigit() and int(o)}
    return Claim(await load(redis, ids), verify)


# KEYS: verifying, pending, stores:pending; ARGV: order id, now, grant key prefix, merchant.
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
if released > 0 then redis.call('SADD', KEYS[3], ARGV[4]) end
return released
"""


async def release_verified(redis: Redis, merchant: int, order_id: int) -> int:
    """The order was confirmed (and what it no longer deserves netted): its held grants that
    are still waiting go to pending, due now. Returns how many."""
    released: int = await redis.eval(  # type: ignore[misc]
        _RELEASE_VERIFIED,
        3,
        _key("verifying", merchant),
        _key("pending", merchant),
        STORES_PENDING,
        str(order_id),
        str(now_ms()),
        f"{PREFIX}grant:",
        str(merchant),
    )
    return int(released)


async def verifying_overdue(redis: Redis, merchant: int) -> set[int]:
    """Orders whose held grants have waited for their confirmation too long (a lost job)."""
    ids: list[str] = await redis.zrangebyscore(_key("verifying", merchant), "-inf", now_ms())
    if not ids:
        return set()
    await redis.zadd(_key("verifying", merchant), {g: now_ms() + VERIFY_RETRY_MS for g in ids})
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hget(grant_key(grant_id), "order")
        orders: list[str | None] = await pipe.execute()
    return {int(o) for o in orders if o and str(o).isdigit() and int(o)}


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
if redis.call('ZCARD', KEYS[1]) == 0 and redis.call('ZCARD', KEYS[2]) == 0
   and redis.call('ZCARD', KEYS[4]) == 0 then
  return redis.call('SREM', KEYS[3], ARGV[1])
end
return 0
"""


async def forget_store_if_idle(redis: Redis, merchant: int) -> None:
    """Drop `merchant` from the sweep set once it has nothing pending, claimed or being
    confirmed (atomically)."""
    await redis.eval(  # type: ignore[misc]
        _FORGET_IF_IDLE,
        4,
        _key("pending", merchant),
        _key("claimed", merchant),
        STORES_PENDING,
        _key("verifying", merchant),
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
