"""Campaigns: points (or a reset) for many customers at once, through the ledger.

A campaign is one synthetic rule outcome per customer (or one for the whole store with
`select_all`), so the ledger's idempotency applies: running the same campaign id again grants
nothing twice, and the grants go out through the usual batching and rate limits.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import ledger, queue
from service.errors import AdminInputError
from service.ids import parse_id
from service.rules.engine import Outcome

CHANNELS = frozenset({"email", "sms", "mobile"})


@dataclass(frozen=True, slots=True)
class Campaign:
    """What to grant, to whom, and under which id; see `plan`."""

    merchant: int
    name: str
    reason: str
    signed_points: int
    channels: tuple[str, ...]
    #: The ledger's grant mode: "", "select_all", "reset" or "reset_all".
    mode: str
    everyone: bool


def plan(
    merchant: int,
    *,
    reason: str,
    points: int | None,
    grant_type: str,
    channels: tuple[str, ...],
    everyone: bool,
    reset: bool,
    campaign_id: str | None,
) -> Campaign:
    """The campaign these options describe. Without an id, its name is derived from the reason
    and the action, so the same command run twice is the same campaign."""
    if not set(channels) <= CHANNELS:
        raise AdminInputError("--channels takes email, sms and mobile")
    action = "reset" if reset else f"{points}|{grant_type}"
    name = campaign_id or hashlib.sha256(f"{reason}|{action}".encode()).hexdigest()[:12]
    # A reset is recorded as a 1-point "minus" grant (so the ledger sends it exactly once) and
    # goes out with the reset flag and no points.
    signed = -1 if reset else (points or 0) * (1 if grant_type == "plus" else -1)
    mode = {(True, True): "reset_all", (True, False): "reset", (False, True): "select_all"}.get(
        (reset, everyone), ""
    )
    return Campaign(merchant, name, reason, signed, channels, mode, everyone)


def customer_ids(text: str) -> tuple[list[int], int]:
    """The customer ids of a file (one a line; CSV: the first column) and how many non-empty
    lines had none (a header, or ids in other digits)."""
    lines = [line for line in text.splitlines() if line.strip()]
    ids = [c for c in (parse_id(line.split(",")[0]) for line in lines) if c is not None]
    return ids, len(lines) - len(ids)


async def grant(
    redis: Redis,
    pool: ArqRedis,
    campaign: Campaign,
    customers: Iterable[int],
    stop: asyncio.Event,
) -> tuple[int, bool]:
    """Record the campaign's grant for each customer, then ask for a flush: (new grants,
    whether `stop` ended it early). Each customer's grant is one atomic ledger commit, so a
    stop between two leaves nothing half-done."""
    made, interrupted = 0, False
    for customer in customers:
        if stop.is_set():
            interrupted = True
            break
        scope = f"campaign:{campaign.name}:{'all' if campaign.everyone else customer}"
        outcome = Outcome(
            f"campaign:{campaign.name}",
            campaign.name,
            "grant",
            campaign.signed_points,
            campaign.reason,
            campaign.channels,
            "campaign",
            scope=scope,
            mode=campaign.mode,
        )
        new = await ledger.apply_outcomes(redis, campaign.merchant, [outcome], customer=customer)
        made += len(new)
    await queue.enqueue_flush(pool, campaign.merchant, 0)
    return made, interrupted
