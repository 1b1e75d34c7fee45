"""What a rule's record deserves, turned into grants: only differences from what was granted,
per customer, opposite unsent grants netted first, daily caps applied to increases, each grant
within Salla's per-call limit. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.ledger.order_state import (
    NETTABLE_STATES,
    OPEN_STATES,
    REVERSAL_PREFIX,
    RuleRecord,
    holder,
    target,
)
from service.rules.model import MAX_POINTS_PER_CALL


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
