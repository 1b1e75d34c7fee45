"""Group grants into the fewest Salla calls. Pure.

One call gives the same `points`, `type`, `reason` and `channel_send` to every customer in it,
so grants are grouped by that key and each group is chunked by the maximum customers per call.
A customer appears at most once per call (a second grant with the same key goes in the next
chunk), so no call relies on Salla crediting a repeated id twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from service.ledger import Grant


@dataclass(frozen=True, slots=True)
class Batch:
    type: str
    points: int
    reason: str
    channels: tuple[str, ...]
    grants: tuple[Grant, ...]

    @property
    def customers(self) -> list[int]:
        return [g.customer for g in self.grants]


def plan_batches(grants: Iterable[Grant], max_customers: int) -> list[Batch]:
    """Batches for `grants`, in order of each group's oldest grant."""
    if max_customers < 1:
        raise ValueError("max_customers must be at least 1")
    groups: dict[tuple[str, int, str, tuple[str, ...], str], list[Grant]] = {}
    for grant in sorted(grants, key=lambda g: (g.created_ms, g.id)):
        groups.setdefault(grant.group_key, []).append(grant)
    batches: list[Batch] = []
    for (grant_type, points, reason, channels, _alone), members in groups.items():
        for chunk in _chunks(members, max_customers):
            batches.append(Batch(grant_type, points, reason, channels, tuple(chunk)))
    return batches


def _chunks(members: Sequence[Grant], size: int) -> list[list[Grant]]:
    """Split one group into the fewest calls: max(ceil(n / size), most repeats of a customer).

    Grants are ordered customer by customer (most repeated first) and dealt round-robin into
    that many chunks, so a customer's grants land in distinct chunks and no chunk exceeds size.
    """
    by_customer: dict[int, list[Grant]] = {}
    for grant in members:
        by_customer.setdefault(grant.customer, []).append(grant)
    most_repeated = max(len(grants) for grants in by_customer.values())
    count = max(math.ceil(len(members) / size), most_repeated)
    ordered = [g for grants in sorted(by_customer.values(), key=len, reverse=True) for g in grants]
    chunks: list[list[Grant]] = [[] for _ in range(count)]
    for index, grant in enumerate(ordered):
        chunks[index % count].append(grant)
    return chunks
