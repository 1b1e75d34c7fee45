"""Where one event of an order stands among the others: its key, and how two keys compare.
Pure.

`order.created` comes before any other event of its order; then the envelope's `created_at`
(whole seconds); between two `order.status.updated`, Salla's status-history id; otherwise
arrival at our edge (the inbox entry id). A state fetched from Salla's orders API is newer than
every webhook that arrived before it was asked for, within the clocks' skew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
