"""The read / decide / commit loop: one event (or a state fetched from Salla) → every scope it
touches, decided by the pure core (service/ledger/order_state.py) and committed at once."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from service import autopipe, keys, process_state
from service.ledger import compact, order_state, settle
from service.ledger.commit import Writes, commit
from service.ledger.event_key import EventKey
from service.ledger.facts import OrderFacts
from service.ledger.order_state import EventVerdicts, RuleRecord, ScopedVerdict, Verdict
from service.ledger.records import LISTING_FRESH_S, SETTLED_GRANT_TTL_S, Diff, Grant, now_ms
from service.ledger.settle import OpenGrant
from service.rules.engine import Outcome


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
    #: The order was retired (`LEDGER_RETENTION_DAYS`): the event was refused, nothing changed.
    retired: bool = False


@dataclass(frozen=True, slots=True)
class OrderRead:
    """The order's entry as read: its facts and its version (a compacted entry: its packed
    value, which changes whenever it does); `stored`: its form (service/ledger/compact.py)."""

    facts: OrderFacts
    version: str
    raw: Mapping[str, str]
    stored: compact.Stored = field(default_factory=lambda: compact.Stored({}))


async def read_order(redis: Redis, merchant: int, order_id: int) -> OrderRead:
    stored = await compact.read_stored(redis, merchant, order_id)
    raw = stored.raw
    version = stored.compact or raw.get("v", "")
    return OrderRead(OrderFacts.from_fields(raw), version, raw, stored)


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
        if read is not None and read.stored.retired:
            return Applied(retired=True)
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
        linked = await pipe.execute("SMEMBERS", keys.order_index(merchant, order_id))
        linked |= set(read.stored.linked if read else ())
    names = sorted(order_state.scopes_of(event, order_id, linked, read.facts if read else None))
    others = [s for s in names if read is None or s != order_scope]  # the order's is read
    # Futures of one auto-pipeline: queued together, awaited in turn (no gather: most events
    # read nothing more).
    pending = [pipe.execute("HGETALL", keys.entry(merchant, s)) for s in others]
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
            caps[(scope, rule)] = (keys.cap(merchant, rule, capped.customer, capped.day), 0)
    if caps:
        names_cap = sorted({name for name, _ in caps.values()})
        # One MGET: the counters are the store's keys (one slot), which a Redis Cluster allows.
        values = await redis.mget(names_cap)
        cap_raw = dict(zip(names_cap, values, strict=True))
    now = now_ms()
    settlements: dict[tuple[str, str], settle.Settlement] = {}
    for (scope, rule), record in moved.items():
        holder = holders[(scope, rule)]
        used = {}
        if (scope, rule) in caps and holder is not None:
            used = {holder.customer: int(cap_raw.get(caps[(scope, rule)][0]) or 0)}
        settlements[(scope, rule)] = settle.settle(
            rule, record, states, cap_used=used, now_ms=now, new_id=_grant_ids(merchant)
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
    writes = Writes()
    # The order's version (as the judge read its facts) guards every scope of the commit.
    for scope in {s for s, _ in moved} | ({order_scope} if order_scope else set()):
        expected = entries[scope].get("v")
        if read is not None and scope == order_scope and read.stored.compact:
            # Compacted: the full entry must still be absent and the compacted one unchanged.
            writes.check(keys.compacted(merchant, order_id), "", read.stored.compact)
            expected = None
        writes.check(keys.entry(merchant, scope), "v", expected)
        writes.hset(keys.entry(merchant, scope), "v", str(int(entries[scope].get("v") or 0) + 1))
    compaction_due = 0
    if read is not None and (read.stored.compact or not read.raw):
        if read.stored.compact:  # written in full again: every record, the facts, the index
            _expand(writes, merchant, order_id, read, records[order_scope], settlements)
            facts_changed = True
        compaction_due = compact.queue(writes, merchant, order_id, now_ms())
    for grant_id in open_ids:
        writes.check(keys.grant(grant_id), "state", state_seen.get(grant_id))
    for name, value in cap_raw.items():
        writes.check(name, "", value)
    if facts_changed and decided.facts is not None:
        writes.hset(keys.entry(merchant, order_scope), mapping=decided.facts.to_fields())
    for (scope, rule), settlement in settlements.items():
        _write(writes, merchant, scope, rule, settlement, caps.get((scope, rule)), order_id)
    for grant in new_grants:
        writes.hset(keys.grant(grant.id), mapping=grant.to_redis())
        writes.zadd(keys.grant_set("pending", merchant), {grant.id: grant.due_ms})
        _index(writes, grant)
    # Cross-store keys live in other slots (the store's index shard): written next to the
    # commit, never inside it, and before it (queued in the same pipeline), so a crash after
    # the commit cannot leave a store with unsent grants that the sweep does not know of. A
    # conflict leaves a grant id in the log that was never created: the export skips ids
    # without a record.
    pipe = autopipe.auto(redis)
    cross = []
    listing = None
    shard = keys.index_shard(merchant)
    if new_grants or any(s.netted for s in settlements.values()):
        listing = _listing(writes, merchant)
        if listing is not None:
            cross.append(pipe.execute("SADD", keys.stores_pending(shard), str(merchant)))
    if new_grants:  # one ZADD for the grants of every event of the shard in this loop turn
        logged = [x for g in new_grants for x in (g.created_ms, g.id)]
        cross.append(pipe.merged("ZADD", keys.grant_log(shard), *logged))
    listed = compact.store_due(redis, merchant, compaction_due) if compaction_due else None
    if listed is not None:
        cross.append(listed)
    committed = await commit(redis, writes)
    for reply in cross:
        await reply
    if not committed:
        return None
    if listing is not None:  # only a listing whose time was committed covers later commits
        process_state.listed_stores[merchant] = listing
    _report(diffs, merchant, before, settlements)
    return Applied(new_grants, ask_salla=ask, changed=True)


def _listing(writes: Writes, merchant: int) -> float | None:
    """List the store in `stores:pending` with this commit, unless this process did so less
    than `LISTING_FRESH_S` ago (then None): one cross-store command per store every few
    seconds, not one per event. The listing's time goes into the commit, and the sweep forgets
    no store listed less than `LISTING_FRESH_S` + a margin ago (`sweep.forget_store_if_idle`),
    so a listing this process relies on is never undone under its feet."""
    now = time.time()
    last = process_state.listed_stores.get(merchant)
    if last is not None and now - last < LISTING_FRESH_S:
        return None
    # Kept an hour: only a listing younger than the sweep's guard (about a minute) matters.
    writes.set(keys.listed_at(merchant), str(int(now * 1000)), ex=3600)
    return now


def _expand(
    writes: Writes,
    merchant: int,
    order_id: int,
    read: OrderRead,
    records: Mapping[str, RuleRecord],
    settlements: Mapping[tuple[str, str], settle.Settlement],
) -> None:
    """A compacted entry that an event changes is written in full again: the records the event
    did not move as they were read, the facts (by the caller), the index it had folded in."""
    key = keys.entry(merchant, f"order:{order_id}")
    for rule, record in records.items():
        if (f"order:{order_id}", rule) not in settlements:
            writes.hset(key, f"r:{rule}", record.encoded())
    writes.delete(keys.compacted(merchant, order_id))
    for scope in read.stored.linked:
        writes.sadd(keys.order_index(merchant, order_id), scope)


def _grant_ids(merchant: int) -> Callable[[], str]:
    # 32 random hex digits (a uuid4's worth, without building the UUID: a share of each
    # event's time) after the store, so a grant's key is found from its id alone.
    return lambda: keys.new_grant_id(merchant, os.urandom(16).hex())


def _grant(merchant: int, scope: str, rule: str, new: settle.NewGrant, trace_id: str) -> Grant:
    # duplicates: keyword construction, like truth.apply_fetched's call (only the shape is shared).
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


def _write(
    writes: Writes,
    merchant: int,
    scope: str,
    rule: str,
    settlement: settle.Settlement,
    cap: tuple[str, int] | None,
    order_id: int,
) -> None:
    key = keys.entry(merchant, scope)
    writes.hset(key, f"r:{rule}", settlement.record.encoded())
    for grant_id in settlement.netted:
        writes.hset(keys.grant(grant_id), mapping={"state": "netted", "error": ""})
        writes.expire(keys.grant(grant_id), SETTLED_GRANT_TTL_S)
        for kind in ("pending", "parked", "verifying"):
            writes.zrem(keys.grant_set(kind, merchant), grant_id)
    if cap is not None:
        for amount in settlement.cap_taken.values():
            writes.incrby(cap[0], amount)
            writes.expire(cap[0], 3 * 86400)
    if order_id and scope != f"order:{order_id}":
        writes.sadd(keys.order_index(merchant, order_id), scope)


def _report(
    diffs: list[Diff] | None,
    merchant: int,
    before: Mapping[tuple[str, str], RuleRecord],
    settlements: dict[tuple[str, str], settle.Settlement],
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


def _index(writes: Writes, grant: Grant) -> None:
    """Admin lookups: a grant by its scope and its customer. Kept as long as grants. (The
    export's log of every grant is a cross-store key: written beside the commit.)"""
    for name in (
        keys.scope_grants(grant.merchant, grant.scope),
        keys.customer_grants(grant.merchant, grant.customer),
    ):
        writes.zadd(name, {grant.id: grant.created_ms})
        writes.expire(name, SETTLED_GRANT_TTL_S)


async def _open_grants(
    redis: Redis, ids: Sequence[str]
) -> tuple[dict[str, OpenGrant], dict[str, str]]:
    """The unsent grants as settling reads them, and each one's state as read (for the
    commit's check; a missing grant reads as "")."""
    if not ids:
        return {}, {}
    fields = ["state", "points", "type", "due_ms", "customer"]
    pipe = autopipe.auto(redis)
    queued = [pipe.execute("HMGET", keys.grant(g), *fields) for g in ids]
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
