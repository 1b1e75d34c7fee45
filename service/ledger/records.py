"""The ledger's records: a grant as stored, and what one event changed for one rule (`Diff`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import orjson

from service.ledger import order_state

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

REVERSAL_PREFIX = order_state.REVERSAL_PREFIX
NETTABLE_STATES = order_state.NETTABLE_STATES
OPEN_STATES = order_state.OPEN_STATES
#: How long the record of a settled (sent or netted) grant is kept (or until the archiver takes
#: it, `GRANT_ARCHIVE_DIR`). Reversals are computed from the ledger entries, not from these:
#: a settled order's entry is compacted, not dropped (service/ledger/compact.py).
SETTLED_GRANT_TTL_S = 90 * 86400
#: A worker lists a store in `stores:pending` at most once per this many seconds; the sweep
#: forgets no store listed more recently than this plus `LISTING_MARGIN_S` (clocks of
#: different machines may disagree by that much).
LISTING_FRESH_S = 10.0
LISTING_MARGIN_S = 60.0


def now_ms() -> int:
    return int(time.time() * 1000)


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
