"""What an order deserves, from the set of its events: the pure order-state core. No I/O.

Salla documents no ordering of webhooks, re-sends a failed one minutes later, and stamps them
with one-second resolution; workers process a batch concurrently. So the outcome must be a
function of the *set* of events seen, not of the order they are processed in:

* Every event of an order has a key (`EventKey`): `order.created` before any other event of its
  order; then the envelope's `created_at`; between two `order.status.updated`, Salla's
  status-history id; otherwise arrival at our edge (the inbox entry id). A state fetched from
  Salla's orders API is newer than every webhook that arrived before it was asked for.
* Per rule and order, the newest **decisive** verdict wins (`decide`): `when` held (the scope
  deserves that snapshot's points) or a revocation (it deserves 0). `no_match` and `inactive`
  decide nothing, so an older event still decides a rule no newer event decided.
* Two events that tie on every part of the key but arrival, and disagree, are *ambiguous*: the
  caller asks Salla (`Decision.ambiguous`). Until the answer comes, arrival order stands.
* What a rule's record deserves (`target`) is turned into grants by `settle`: only differences
  from what was granted, per customer (a customer changed on an order moves the points), opposite
  unsent grants netted first, daily caps applied to increases.

The ledger (service/ledger.py) reads records from Redis, calls these functions and commits the
result atomically; everything here takes and returns plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from service.rules.model import MAX_POINTS_PER_CALL

REVERSAL_PREFIX = "Reversal: "
#: States of a grant that an opposite change may still cancel (it has not left for Salla).
NETTABLE_STATES = frozenset({"pending", "parked", "verifying"})
#: States of a grant that is not settled yet.
OPEN_STATES = frozenset({"pending", "parked", "verifying", "claimed", "sending"})

#: Ranks: `order.created` is older than any other event of its order, whatever its stamp; an
#: order Salla no longer has (`order.deleted`, or a 404) is newer than anything.
RANK_CREATED, RANK_EVENT, RANK_GONE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class EventKey:
    """Where one event of an order stands among the others (see the module docstring).

    `at_s`: the envelope's `created_at` in whole seconds (None when it could not be read: the
    event then ties with every event of its rank); for a fetched state, when it was asked for.
    `seq`: the status-history id of an `order.status.updated` (None otherwise).
    `arrival`: the inbox entry id `(ms, n)`; for a fetched state, when it was asked for.
    """

    rank: int
    at_s: int | None
    seq: int | None
    arrival: tuple[int, int]
    fetched: bool = False

    def to_json(self) -> list[Any]:
        return [self.rank, self.at_s, self.seq, self.arrival[0], self.arrival[1], self.fetched]

    @classmethod
    def from_json(cls, raw: list[Any]) -> EventKey:
        rank, at_s, seq, ms, n, fetched = raw
        return cls(int(rank), at_s, seq, (int(ms), int(n)), bool(fetched))


@dataclass(frozen=True, slots=True)
class Comparison:
    newer: bool  # the first key is newer than the second (ties go by arrival)
    near: bool  # only arrival separates them: their true order is unknown


def compare(a: EventKey, b: EventKey, skew_s: int) -> Comparison:
    """Whether `a` is newer than `b`, and whether that rests on arrival alone.

    `skew_s` bounds the gap between Salla's clocks (webhook stamps, the orders API) and ours:
    a webhook that arrived after a state was fetched at T is older than it when stamped before
    T - skew, newer when stamped after T + skew, and near it otherwise.
    """
    if a.rank != b.rank:
        return Comparison(a.rank > b.rank, False)
    if a.fetched or b.fetched:
        return _compare_fetched(a, b, skew_s)
    by_arrival = Comparison(a.arrival > b.arrival, True)
    if a.at_s is None or b.at_s is None:
        return by_arrival
    if a.at_s != b.at_s:
        return Comparison(a.at_s > b.at_s, False)
    if a.seq is not None and b.seq is not None and a.seq != b.seq:
        return Comparison(a.seq > b.seq, False)
    return by_arrival


def _compare_fetched(a: EventKey, b: EventKey, skew_s: int) -> Comparison:
    if a.fetched and b.fetched:
        return Comparison(a.arrival > b.arrival, False)
    fetched, hook = (a, b) if a.fetched else (b, a)
    if hook.arrival < fetched.arrival:  # Salla's answer already included what it described
        hook_newer = False
    elif hook.at_s is None or fetched.at_s is None:
        return Comparison(a is hook, True)
    elif hook.at_s < fetched.at_s - skew_s:
        hook_newer = False
    elif hook.at_s > fetched.at_s + skew_s:
        hook_newer = True
    else:  # within the clocks' skew: arrival stands (the webhook came later) until Salla says
        return Comparison(a is hook, True)
    return Comparison(hook_newer if a is hook else not hook_newer, False)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decisive verdict of one rule on one event: the scope deserves `points` (signed; 0 for
    a revocation or less than one point). `key` is None for events outside orders (reviews,
    customers): those have no order, and the one processed last stands."""

    key: EventKey | None
    order: int
    customer: int
    points: int
    reason: str = ""
    channels: tuple[str, ...] = ()
    version: str = ""
    hold_s: int = 0
    #: When the hold counts from (the order's completion), epoch ms; 0: when it is granted.
    since_ms: int = 0
    mode: str = ""
    #: The local day and the rule's daily cap per customer (None: no cap).
    day: str = ""
    cap: int | None = None

    def same_outcome(self, other: Verdict) -> bool:
        """Whether the two verdicts give the scope the same: nothing, or the same points to the
        same customer."""
        if not self.points and not other.points:
            return True
        return (self.points, self.customer) == (other.points, other.customer)

    def to_json(self) -> list[Any]:
        return [
            self.key.to_json() if self.key else None,
            self.order,
            self.customer,
            self.points,
            self.reason,
            list(self.channels),
            self.version,
            self.hold_s,
            self.since_ms,
            self.mode,
            self.day,
            self.cap,
        ]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Verdict:
        key, order, customer, points, reason, channels, version, hold, since, mode, day, cap = raw
        return cls(
            EventKey.from_json(key) if key else None,
            int(order),
            int(customer),
            int(points),
            str(reason),
            tuple(channels),
            str(version),
            int(hold),
            int(since),
            str(mode),
            str(day),
            None if cap is None else int(cap),
        )


@dataclass(frozen=True, slots=True)
class RuleRecord:
    """What the ledger keeps for one rule in one scope.

    `verdicts`: the newest decisive verdict per order (0: events outside orders); `granted`:
    signed points granted per customer (sent or on their way); `deserved`: what was deserved per
    customer when last settled (a daily cap may have granted less); `open`: unsent grant ids;
    `reason`/`channels`: of the last grant given, for reversals.
    """

    verdicts: Mapping[int, Verdict] = field(default_factory=dict)
    granted: Mapping[int, int] = field(default_factory=dict)
    deserved: Mapping[int, int] = field(default_factory=dict)
    open: tuple[str, ...] = ()
    reason: str = ""
    channels: tuple[str, ...] = ()
    version: str = ""

    @property
    def orders(self) -> frozenset[int]:
        return frozenset(o for o in self.verdicts if o)

    def encoded(self) -> str:
        return orjson.dumps(
            {
                "verdicts": {str(o): v.to_json() for o, v in self.verdicts.items()},
                "granted": {str(c): p for c, p in self.granted.items() if p},
                "deserved": {str(c): p for c, p in self.deserved.items() if p},
                "open": list(self.open),
                "reason": self.reason,
                "channels": list(self.channels),
                "version": self.version,
            },
        ).decode()

    @classmethod
    def decode(cls, raw: str | None) -> RuleRecord:
        if not raw:
            return cls()
        doc = orjson.loads(raw)
        return cls(
            verdicts={int(o): Verdict.from_json(v) for o, v in doc.get("verdicts", {}).items()},
            granted={int(c): int(p) for c, p in doc.get("granted", {}).items()},
            deserved={int(c): int(p) for c, p in doc.get("deserved", {}).items()},
            open=tuple(doc.get("open", ())),
            reason=str(doc.get("reason", "")),
            channels=tuple(doc.get("channels", ())),
            version=str(doc.get("version", "")),
        )

    @property
    def granted_total(self) -> int:
        return sum(self.granted.values())


#: A rule the scope has no record of (immutable, so one is enough).
_NO_RECORD = RuleRecord()


@dataclass(frozen=True, slots=True)
class Decision:
    record: RuleRecord
    #: The incoming verdict ties with the standing one on everything but arrival, and they
    #: disagree: only Salla can say which is the order's state.
    ambiguous: bool = False


def decide(record: RuleRecord, incoming: Verdict, skew_s: int) -> Decision:
    """Let `incoming` decide the rule for its order, if it is the newest decisive verdict."""
    standing = record.verdicts.get(incoming.order)
    if standing is None or incoming.key is None or standing.key is None:
        return Decision(_with_verdict(record, incoming))
    order = compare(incoming.key, standing.key, skew_s)
    ambiguous = order.near and not incoming.same_outcome(standing)
    if order.newer or incoming.key == standing.key:
        return Decision(_with_verdict(record, incoming), ambiguous)
    return Decision(record, ambiguous)


def _with_verdict(record: RuleRecord, verdict: Verdict) -> RuleRecord:
    # The constructor, not `dataclasses.replace`: this runs for every event (replace costs
    # several times more).
    return RuleRecord(
        {**record.verdicts, verdict.order: verdict},
        record.granted,
        record.deserved,
        record.open,
        record.reason,
        record.channels,
        record.version,
    )


def holder(record: RuleRecord) -> Verdict | None:
    """The verdict the scope's points follow: of the orders whose newest verdict grants, the
    lowest order id (a once-per-customer bonus belongs to one order at a time); None when no
    order's verdict grants anything."""
    granting = [v for v in record.verdicts.values() if v.points]
    return min(granting, key=lambda v: v.order) if granting else None


def target(record: RuleRecord) -> dict[int, int]:
    """Signed points the scope deserves now, per customer."""
    verdict = holder(record)
    # Customer 0 is "every customer of the store" (a campaign's select_all).
    return {verdict.customer: verdict.points} if verdict else {}


@dataclass(frozen=True, slots=True)
class OpenGrant:
    """The fields of an unsent grant that settling reads."""

    id: str
    customer: int
    signed_points: int
    state: str
    due_ms: int


@dataclass(frozen=True, slots=True)
class NewGrant:
    """A grant `settle` decided to create (the ledger gives it its record and queues it)."""

    id: str
    customer: int
    signed_points: int
    reason: str
    channels: tuple[str, ...]
    due_ms: int
    mode: str
    order: int
    #: Held for a return window: confirmed against Salla's order before it may be sent.
    held: bool


@dataclass(frozen=True, slots=True)
class Settlement:
    record: RuleRecord
    netted: tuple[str, ...] = ()
    new: tuple[NewGrant, ...] = ()
    #: Points taken from a daily cap, per customer.
    cap_taken: Mapping[int, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.netted or self.new)


def settle(
    rule: str,
    record: RuleRecord,
    grants: Mapping[str, OpenGrant],
    *,
    cap_used: Mapping[int, int],
    now_ms: int,
    new_id: Callable[[], str],
) -> Settlement:
    """Bring what the record granted to what it deserves now, per customer.

    `grants`: the record's open grants as they stand (missing ones are settled); `cap_used`:
    points the rule already granted each customer on the holder's day (for its daily cap).
    """
    verdict = holder(record)
    goal = target(record)
    customers = sorted(set(record.granted) | set(goal) | set(record.deserved))
    open_ids = [g for g in record.open if g in grants and grants[g].state in OPEN_STATES]
    granted = dict(record.granted)
    deserved = dict(record.deserved)
    netted: list[str] = []
    new: list[NewGrant] = []
    cap_taken: dict[int, int] = {}
    for customer in customers:
        want = goal.get(customer, 0)
        had = granted.get(customer, 0)
        was = deserved.get(customer, had)
        if want == was:  # nothing changed (points a daily cap cut are not granted later)
            continue
        cap = verdict.cap if verdict and customer == verdict.customer else None
        after, taken = _next_granted(had, was, want, cap, cap_used.get(customer, 0))
        deserved[customer] = want
        granted[customer] = after
        if taken:
            cap_taken[customer] = taken
        remaining = after - had
        if not remaining:
            continue
        kept_due = 0
        mine = [g for g in open_ids if g in grants and grants[g].customer == customer]
        for grant_id in reversed(mine):  # opposite unsent grants cancel out first
            if remaining == 0:
                break
            unsent = grants[grant_id]
            if unsent.state not in NETTABLE_STATES or _sign(unsent.signed_points) == _sign(
                remaining
            ):
                continue
            netted.append(grant_id)
            open_ids.remove(grant_id)
            kept_due = max(kept_due, unsent.due_ms)
            remaining += unsent.signed_points
            if _sign(remaining) == _sign(unsent.signed_points):  # over-cancelled: re-grant
                break
        if not remaining:
            continue
        # Towards what the holder deserves (plus or minus rules alike), or taken back.
        giving = (
            verdict is not None
            and customer == verdict.customer
            and want != 0
            and _sign(remaining) == _sign(want)
        )
        if giving and verdict is not None:
            reason, channels, mode = verdict.reason, verdict.channels, verdict.mode
            # A replacement keeps the hold of what it replaces; the hold counts from completion.
            hold_ms = verdict.hold_s * 1000 if remaining > 0 else 0  # minus grants go now
            due = kept_due or ((verdict.since_ms or now_ms) + hold_ms if hold_ms else now_ms)
            held = hold_ms > 0 and verdict.order != 0
            order = verdict.order
        else:  # taken back (or moved): say so, with the reason the points were given for
            reason = REVERSAL_PREFIX + (record.reason or rule)
            channels, mode, due, held = record.channels, "", now_ms, False
            order = verdict.order if verdict else _any_order(record)
        for part in _split(abs(remaining)):
            grant = NewGrant(
                id=new_id(),
                customer=customer,
                signed_points=part * _sign(remaining),
                reason=reason,
                channels=channels,
                due_ms=due,
                mode=mode,
                order=order,
                held=held,
            )
            new.append(grant)
            open_ids.append(grant.id)
    settled = RuleRecord(
        record.verdicts,
        granted={c: p for c, p in granted.items() if p},
        deserved={c: p for c, p in deserved.items() if p},
        open=tuple(open_ids),
        reason=verdict.reason if verdict else record.reason,
        channels=verdict.channels if verdict else record.channels,
        version=verdict.version if verdict else record.version,
    )
    return Settlement(settled, tuple(netted), tuple(new), cap_taken)


def _any_order(record: RuleRecord) -> int:
    return min(record.orders) if record.orders else 0


def _next_granted(
    granted: int, deserved: int, target: int, cap: int | None, cap_used: int
) -> tuple[int, int]:
    """What is granted after the deserved points move from `deserved` to `target`, and how much
    of a daily cap that takes. Increases are capped; points a cap cut are not granted later;
    decreases take back what was granted, never more."""
    if target == 0:
        return 0, 0
    sign = _sign(target)
    if deserved == 0 or _sign(deserved) != sign or abs(target) > abs(deserved):
        base = 0 if _sign(deserved) not in (0, sign) else abs(deserved)
        increase = abs(target) - base
        allowed = increase if cap is None else max(0, min(increase, cap - cap_used))
        start = 0 if _sign(granted) not in (0, sign) else abs(granted)
        return sign * (start + allowed), allowed
    return sign * max(0, abs(granted) - (abs(deserved) - abs(target))), 0


def _split(points: int) -> list[int]:
    """Salla takes at most 999,999 points per call: larger changes become several grants."""
    parts = [MAX_POINTS_PER_CALL] * (points // MAX_POINTS_PER_CALL)
    if points % MAX_POINTS_PER_CALL:
        parts.append(points % MAX_POINTS_PER_CALL)
    return parts


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


# --- the order's own facts -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """What the order's entry remembers beyond rules: the newest event seen (any verdict),
    whether any event showed it completed, and the newest state seen (for reconciliation)."""

    newest: EventKey | None = None
    #: The newest event for which the file-level `revoke_when` held: every verdict of an
    #: older event of this order deserves nothing, whichever rule and scope it is for (a rule
    #: that did not hear the cancel still must not grant for an older completion).
    revoked: EventKey | None = None
    #: Per rule, the newest event that decided it for this order and the scope it went to: an
    #: older event cannot decide the rule anywhere (a customer changed since), and a newer one
    #: for another scope takes the points back from the old one (they move).
    rules: Mapping[str, tuple[EventKey, str]] = field(default_factory=dict)
    completed: bool = False
    status: str = ""
    total: str = ""
    customer: int = 0
    gone: bool = False

    def to_fields(self) -> dict[str, str]:
        rules = {r: [k.to_json(), s] for r, (k, s) in self.rules.items()}
        return {
            "newest": orjson.dumps(self.newest.to_json()).decode() if self.newest else "",
            "revoked": orjson.dumps(self.revoked.to_json()).decode() if self.revoked else "",
            "rules": orjson.dumps(rules).decode(),
            "completed": "1" if self.completed else "",
            "status": self.status,
            "total": self.total,
            "customer": str(self.customer or ""),
            "gone": "1" if self.gone else "",
        }

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> OrderFacts:
        if not raw:  # an order seen for the first time
            return cls()
        newest = raw.get("newest", "")
        revoked = raw.get("revoked", "")
        customer = raw.get("customer", "")
        return cls(
            newest=EventKey.from_json(orjson.loads(newest)) if newest else None,
            revoked=EventKey.from_json(orjson.loads(revoked)) if revoked else None,
            rules={
                r: (EventKey.from_json(k), str(s))
                for r, (k, s) in orjson.loads(raw.get("rules") or "{}").items()
            },
            completed=raw.get("completed") == "1",
            status=raw.get("status", ""),
            total=raw.get("total", ""),
            customer=int(customer) if customer.isascii() and customer.isdigit() else 0,
            gone=raw.get("gone") == "1",
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One event's view of the order (what reconciliation compares with Salla's list)."""

    key: EventKey
    completed: bool
    status: str
    total: str
    customer: int


@dataclass(frozen=True, slots=True)
class Observation:
    facts: OrderFacts
    #: The order shows `completed` for the first time, in an event older than one already
    #: applied: that newer event was judged without knowing it (`order.completed_once`).
    late_completion: bool = False


def observe(
    facts: OrderFacts,
    snapshot: Snapshot,
    skew_s: int,
    *,
    revoke: bool = False,
    rules: Mapping[str, tuple[EventKey, str]] | None = None,
) -> Observation:
    """Fold one event's snapshot into the order's facts (`revoke`: its revoke_when held;
    `rules`: the rules' newest deciding events after it, when the caller has them)."""
    newer = facts.newest is None or compare(snapshot.key, facts.newest, skew_s).newer
    late = snapshot.completed and not facts.completed and not newer
    # One constructor call (this runs for every order event; `replace` costs more).
    updated = OrderFacts(
        newest=snapshot.key if newer else facts.newest,
        revoked=newest_revocation(facts.revoked, snapshot.key if revoke else None, skew_s),
        rules=facts.rules if rules is None else rules,
        completed=facts.completed or snapshot.completed,
        status=snapshot.status if newer else facts.status,
        total=snapshot.total if newer else facts.total,
        customer=(snapshot.customer or facts.customer) if newer else facts.customer,
        gone=facts.gone or snapshot.key.rank == RANK_GONE,
    )
    return Observation(updated, late)


def newest_revocation(
    standing: EventKey | None, incoming: EventKey | None, skew_s: int
) -> EventKey | None:
    if standing is None or incoming is None:
        return standing or incoming
    return incoming if compare(incoming, standing, skew_s).newer else standing


def _under_revocation(
    verdict: Verdict, revoked: EventKey | None, skew_s: int
) -> tuple[Verdict, bool]:
    """A grant from an event older than the order's newest revocation deserves nothing; one
    that only arrival separates from it is ambiguous."""
    if revoked is None or verdict.key is None or not verdict.points or verdict.key == revoked:
        return verdict, False
    order = compare(verdict.key, revoked, skew_s)
    if order.newer:
        return verdict, order.near
    return replace(verdict, key=revoked, points=0), order.near


def revocations(
    records: Mapping[str, RuleRecord], order: int, key: EventKey | None
) -> Iterable[tuple[str, Verdict]]:
    """The file-level `revoke_when`: a 0 verdict for every rule recorded for `order`, including
    rules deleted since (reversals come from the ledger, never from today's rules)."""
    for rule, record in records.items():
        standing = record.verdicts.get(order)
        if standing is not None:
            yield rule, Verdict(key, order, standing.customer, 0)


# --- one event, every scope it touches ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopedVerdict:
    """One rule's decisive verdict on one event, for one scope."""

    scope: str
    rule: str
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class EventVerdicts:
    """What one event says: every decisive verdict of its rules, whether the file-level
    `revoke_when` holds (every rule recorded for the order goes to 0), and the event's view of
    its order (None outside orders)."""

    verdicts: Sequence[ScopedVerdict]
    revoke: bool = False
    snapshot: Snapshot | None = None


@dataclass(frozen=True, slots=True)
class Decided:
    """An event's decisions before settling: the records whose verdicts moved (with what they
    were), the order's facts after it, and whether only Salla can say what the order is."""

    moved: Mapping[tuple[str, str], RuleRecord]
    before: Mapping[tuple[str, str], RuleRecord]
    facts: OrderFacts | None
    ask_salla: bool


def scopes_of(
    event: EventVerdicts, order_id: int, linked: Iterable[str], facts: OrderFacts | None = None
) -> set[str]:
    """Every scope an event touches: its verdicts', the order's own, the scopes its rules last
    went to for this order (points move when the customer changed), and on a revocation the
    scopes the order granted elsewhere (its customers' bonuses)."""
    scopes = {item.scope for item in event.verdicts}
    if order_id:
        scopes.add(f"order:{order_id}")
        if facts is not None:
            scopes |= {facts.rules[i.rule][1] for i in event.verdicts if i.rule in facts.rules}
        if event.revoke:
            scopes |= set(linked)
    return scopes


def decide_event(
    records: Mapping[str, Mapping[str, RuleRecord]],
    facts: OrderFacts | None,
    event: EventVerdicts,
    order_id: int,
    skew_s: int,
) -> Decided:
    """Let one event decide every rule of every scope it touches (`records`: scope → rule →
    record, for `scopes_of`); `facts` is the order's (None outside orders)."""
    key = event.snapshot.key if event.snapshot else None
    by_scope: dict[str, list[ScopedVerdict]] = {}
    for item in event.verdicts:
        by_scope.setdefault(item.scope, []).append(item)
    ask = False
    decided: dict[tuple[str, str], RuleRecord] = {}
    before: dict[tuple[str, str], RuleRecord] = {}
    standing_revocation = facts.revoked if facts is not None else None
    latest = dict(facts.rules) if facts is not None else {}
    incoming: list[tuple[str, str, Verdict]] = []
    for scope, rules in records.items():
        mine = [(scope, i.rule, i.verdict) for i in by_scope.get(scope, [])]
        if event.revoke and order_id:
            revoked = {r: v for r, v in revocations(rules, order_id, key)}
            mine = [m for m in mine if m[1] not in revoked]
            mine += [(scope, r, v) for r, v in revoked.items()]
        incoming += mine
    for scope, rule, verdict in incoming:
        verdict, near = _under_revocation(verdict, standing_revocation, skew_s)
        ask = ask or near
        targets = [(scope, verdict)]
        last = latest.get(rule) if verdict.key is not None and order_id else None
        if last is not None and verdict.key is not None and last[0] != verdict.key:
            order = compare(verdict.key, last[0], skew_s)
            if last[1] != scope:
                ask = ask or (order.near and bool(verdict.points))
                if not order.newer:
                    continue  # a newer event of this order decided the rule elsewhere
                # The rule's points move: the scope it went to before deserves nothing now.
                targets.append((last[1], replace(verdict, points=0, customer=0)))
        own = verdict.key is not None and bool(order_id) and verdict.order == order_id
        if own and (last is None or compare(verdict.key, last[0], skew_s).newer):  # type: ignore[arg-type]
            latest[rule] = (verdict.key, scope)  # type: ignore[assignment]
        for target_scope, target_verdict in targets:
            rules = records.get(target_scope, {})
            stored = rules.get(rule, _NO_RECORD)
            current = decided.get((target_scope, rule), stored)
            before.setdefault((target_scope, rule), stored)
            decision = decide(current, target_verdict, skew_s)
            ask = ask or decision.ambiguous
            decided[(target_scope, rule)] = decision.record
    observed = (
        observe(facts, event.snapshot, skew_s, revoke=event.revoke, rules=latest)
        if facts is not None and event.snapshot is not None
        else None
    )
    moved = {k: r for k, r in decided.items() if r != before[k]}
    return Decided(
        moved,
        {k: before[k] for k in moved},
        observed.facts if observed else facts,
        ask or bool(observed and observed.late_completion),
    )
