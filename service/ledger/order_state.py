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

Keys and their comparison live in `event_key`, settling in `settle`. The ledger
(service/ledger/apply.py) reads records from Redis, calls these functions and commits the
result atomically; everything here takes and returns plain data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from service.ledger.event_key import EventKey, compare
from service.ledger.facts import OrderFacts, Snapshot, observe

REVERSAL_PREFIX = "Reversal: "
#: States of a grant that an opposite change may still cancel (it has not left for Salla).
NETTABLE_STATES = frozenset({"pending", "parked", "verifying"})
#: States of a grant that is not settled yet.
OPEN_STATES = frozenset({"pending", "parked", "verifying", "claimed", "sending"})


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
