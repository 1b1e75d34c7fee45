"""When each store's orders reconciliation runs: once per `ORDERS_RECONCILE_EVERY_S`, spread
over the period, and again once if the queue lost it.

A store's period starts at its own offset (its id mod the period), so that no minute is
heavy. The scheduler (a cron, every minute) does not visit every store: each index shard keeps
its stores by when the scheduler next looks at each (`keys.orders_reconcile_due`; a store
enters it with its tokens, `tokens.save`, and leaves with them). A run costs the stores due:

- a store whose period began and that has not started this period is started (its marker,
  `keys.orders_reconcile_slot`, says which period started); it is looked at again after
  `CHECK_AFTER_S`;
- a started store whose run arq still has is looked at again after `CHECK_AFTER_S`;
- a started store whose run finished (`keys.orders_reconcile_done`) waits for its next period;
- a started store whose run arq no longer has and that did not finish was lost with the
  queue (a failover): it is queued again, once per period (the marker then reads
  `<period>+`), so a run that fails for good waits for the next period as before.

arq is asked first, the finish mark read second: a job finishes by setting its mark before
arq forgets it, so a run that finished in between is not queued twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from service import keys, queue
from service.delivery.deps import Deps
from service.ledger.shards import due_in_shards
from service.logging import get_logger

log = get_logger("service.orders")

#: How long after starting a store's run the scheduler checks that it finished or is still on
#: the queue (a run that neither is was lost): past the cron's minute, so one look suffices.
CHECK_AFTER_S = 90
#: At most this many stores per index shard per run of the scheduler (the rest are due at the
#: next run, a minute later): 16 x 500 = 8,000 stores a minute.
PER_SHARD = 500


@dataclass
class Pass:
    """What one run of the scheduler did."""

    looked: int = 0
    started: int = 0
    recreated: int = 0


def period(merchant: int, now_s: int, every_s: int) -> int:
    """The number of the store's period at `now_s` (its periods start at its own offset)."""
    return (now_s + merchant % every_s) // every_s


def next_period_start(merchant: int, now_s: int, every_s: int) -> int:
    return (period(merchant, now_s, every_s) + 1) * every_s - merchant % every_s


async def start_due(deps: Deps, now_s: int) -> Pass:
    """Start, check or re-queue each store the schedule says is due at `now_s`."""
    done = Pass()
    every = deps.settings.orders_reconcile_every_s
    if every <= 0:
        return done
    redis = deps.redis
    due = await due_in_shards(redis, keys.orders_reconcile_due, now_s, per_shard=PER_SHARD)
    for merchant, _ in due:
        done.looked += 1
        slot = period(merchant, now_s, every)
        look_again = await _look_at(deps, merchant, slot, done)
        at = now_s + CHECK_AFTER_S if look_again else next_period_start(merchant, now_s, every)
        # XX: a store whose tokens were revoked meanwhile stays out of the schedule.
        await redis.zadd(
            keys.orders_reconcile_due(keys.index_shard(merchant)), {str(merchant): at}, xx=True
        )
    return done


async def _look_at(deps: Deps, merchant: int, slot: int, done: Pass) -> bool:
    """Start the store's run of period `slot`, or check on it; True to look again soon."""
    redis, every = deps.redis, deps.settings.orders_reconcile_every_s
    marker = keys.orders_reconcile_slot(merchant)
    last = await redis.get(marker)
    if last == f"{slot}+":  # queued again once this period already
        return False
    if last == str(slot):
        if await queue.job_known(deps.pool, queue.orders_reconcile_id(merchant, slot)):
            return True
        if await redis.get(keys.orders_reconcile_done(merchant)) == str(slot):
            return False
        log.warning("job_recreated", job=queue.ORDERS_RECONCILE, merchant=merchant, slot=slot)
        done.recreated += 1
    # Two schedulers at once (arq's cron lock makes it rare) queue one job: same id.
    await redis.set(marker, f"{slot}+" if last == str(slot) else str(slot), ex=every * 2)
    await queue.enqueue_orders_reconcile(deps.pool, merchant, slot=slot)
    done.started += 1
    return True
