"""Rule outcomes for ledger tests (what the rule engine would hand the ledger)."""

from __future__ import annotations

from typing import Any

from service.rules.engine import Outcome


def grant_outcome(
    points: int, rule: str = "purchase", reason: str = "order R1", scope: str = "order:1", **kw: Any
) -> Outcome:
    return Outcome(rule, "v1", "grant", points, reason, ("sms",), "test", scope=scope, **kw)


def no_match(rule: str = "purchase") -> Outcome:
    return Outcome(rule, "v1", "no_match", 0, "", ("sms",), "test", scope="order:1")
