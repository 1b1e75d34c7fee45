"""What an order's entry remembers beyond rules, and how one event's view of the order folds
into it: the newest event seen, whether any event showed it completed, the newest revocation,
per rule the newest deciding event, and the newest state seen (for reconciliation). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from service.ledger.event_key import RANK_GONE, EventKey, compare


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
