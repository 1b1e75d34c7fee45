"""Orders waiting for Salla's answer: an `order_truth` job asked after events that could not
decide (same-second disagreements), kept in the store's slot until the job settles it.

arq's queue may lose the job (a failover of its Redis): the record is what remakes it. The
store is listed for the sweep before the record is written (`note_pending_work`), the sweep
queues the job again for an order asked about over `ASK_AGAIN_AFTER_MS` ago (arq refuses the
id while it still has the job), and the store is not forgotten while it has a record. The job
forgets the record when it settles the order, however it ends (applied, confirmed, or Salla
cannot be asked). A record older than `GIVE_UP_AFTER_MS` is dropped, loudly: the orders
reconciliation compares the order with Salla within `ORDERS_RECONCILE_EVERY_S` anyway.
"""

from __future__ import annotations

from redis.asyncio import Redis

from service import keys
from service.ledger.grants import note_pending_work
from service.ledger.records import now_ms
from service.logging import get_logger

log = get_logger("service.ledger")

#: How long a job may take before the sweep queues it again (its retries within arq, for a
#: plan bucket or a Salla outage, keep the same id: queued again is a no-op while arq has it).
ASK_AGAIN_AFTER_MS = 60_000
#: A record this old is dropped (arq's own retries of the job span less).
GIVE_UP_AFTER_MS = 86_400_000


async def note_asked(redis: Redis, merchant: int, order_id: int) -> None:
    """Before the job is queued: the store listed, then the order recorded (a crash between
    leaves the store listed, never the order unlisted)."""
    await note_pending_work(redis, merchant)
    await redis.zadd(keys.asked_salla(merchant), {str(order_id): now_ms()}, nx=True)


async def forget_asked(redis: Redis, merchant: int, order_id: int) -> None:
    await redis.zrem(keys.asked_salla(merchant), str(order_id))


async def asked_overdue(redis: Redis, merchant: int, *, at_ms: int | None = None) -> list[int]:
    """Orders asked about long enough ago that their job may have been lost (the sweep's)."""
    now = now_ms() if at_ms is None else at_ms
    key = keys.asked_salla(merchant)
    dropped = await redis.zremrangebyscore(key, "-inf", now - GIVE_UP_AFTER_MS)
    if dropped:
        log.warning(
            "order_truth_given_up",
            merchant=merchant,
            orders=dropped,
            consequence="left to the orders reconciliation",
        )
    due: list[str] = await redis.zrangebyscore(key, "-inf", now - ASK_AGAIN_AFTER_MS)
    return [int(o) for o in due if o.isdigit()]
