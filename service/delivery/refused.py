"""What a 422 from Salla's loyalty endpoint means for a batch: Salla refuses the whole call for
one bad customer, so the batch is split in halves until the refused customers are alone; each
of those fails on its own (an operator can retry it), the others are sent.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from service.delivery.batching import Batch
from service.ledger import Grant
from service.logging import get_logger

if TYPE_CHECKING:
    from service.delivery.flush import FlushRun

log = get_logger("service.delivery")

#: The longest a bisection waits inline for the rate limiter before putting the rest aside.
BISECT_MAX_WAIT_S = 10.0


async def deliver(run: FlushRun, batch: Batch, grants: list[Grant]) -> None:
    """Send one call; on 422 split it in halves until the refused customers are alone."""
    refusal = await run.call(batch, grants)
    if refusal is None:
        return
    if len(grants) == 1:
        await run.fail(grants, refusal)
        log.error(
            "grant_failed",
            merchant=run.merchant,
            grant_ids=[grants[0].id],
            customer_ids=[grants[0].customer],
            error=refusal,
            status=422,
        )
        return
    middle = len(grants) // 2
    halves = [grants[:middle], grants[middle:]]
    log.warning("batch_bisected", merchant=run.merchant, customers=len(grants), error=refusal)
    for index, half in enumerate(halves):
        rest = [g for h in halves[index:] for g in h]
        wait = await run.next_turn(rest)
        if wait > BISECT_MAX_WAIT_S:
            # Each goes alone next time, so the refused customers are found without this run.
            await run.defer(rest, wait, refusal, isolate=True)
            return
        if wait > 0:
            await asyncio.sleep(wait)
        await deliver(run, batch, half)
