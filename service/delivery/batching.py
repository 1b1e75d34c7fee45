"""Group grants into the fewest Salla calls. Pure.

One call gives the same `points`, `type`, `reason` and `channel_send` to every customer in it,
so grants are grouped by that key and each group is chunked by the maximum customers per call.
A customer appears at most once per call (a second grant with the same key goes in the next
chunk), so no call relies on Salla crediting a repeated id twice.
"""

from __future__ import annotations

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
    groups: dict[tuple[str, int, str, tuple[str, ...]], list[Grant]] = {}
    for grant in sorted(grants, key=lambda g: (g.created_ms, g.id)):
        groups.setdefault(grant.group_key, []).append(grant)
    batches: list[Batch] = []
    for (grant_type, points, reason, channels), members in groups.items():
        for chunk in _chunks(members, max_customers):
            batches.append(Batch(grant_type, points, reason, channels, tuple(chunk)))
    return batches


def _chunks(members: Sequence[Grant], size: int) -> list[list[Grant]]:
    chunks: list[list[Grant]] = []
    seen: list[set[int]] = []
    for grant in members:
        for chunk, customers in zip(chunks, seen, strict=True):
            if len(chunk) < size and grant.customer not in customers:
                chunk.append(grant)
                customers.add(grant.customer)
                break
        else:
            chunks.append([grant])
            seen.append({grant.customer})
    return chunks
