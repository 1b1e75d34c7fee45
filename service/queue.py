"""The thin layer over arq: job names, job ids and enqueueing. Nothing else imports arq's API.

arq runs every job at least once; job ids (`evt:<delivery>`, `flush:<store>:<window>`) avoid
needless duplicates, and the ledger makes the rest harmless.
"""

from __future__ import annotations

import math
import time
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import autopipe, ledger

PROCESS_EVENT = "process_event"
#: The inbox (service/inbox.py): webhooks accepted for the rules, also kept for replay.
WEBHOOK_STREAM = f"{ledger.PREFIX}webhooks"
#: The consumer group the workers read the inbox as.
INBOX_GROUP = "workers"
FLUSH = "flush"
RECONCILE = "reconcile"


def redis_settings(url: str, *, ride_out_outages: bool = False) -> RedisSettings:
    """arq's connection settings. `ride_out_outages` (the worker): every command is retried
    with backoff for about 15 s, so a Redis restart or failover pauses the worker instead of
    ending its main loop (arq lets a failed poll stop the worker)."""
    settings = RedisSettings.from_dsn(url)
    if ride_out_outages:
        settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=12)
        settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
        settings.conn_retries = 30
    return settings


async def connect(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url))


# KEYS: the delivery's "seen" key, job key, result key, queue; ARGV: job, expires ms, score, id.
# What arq's enqueue_job does (job key with expiry + queue entry, refused if the job exists),
# plus the "already processed" check, in one atomic round trip: the webhook's whole Redis cost.
_ENQUEUE_EVENT = """
if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) > 0 then return 0 end
redis.call('PSETEX', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
return 1
"""


# KEYS: the delivery's "seen" key, the inbox stream; ARGV: seen TTL s, MINID ("" = keep all),
# merchant, event, delivery, trace id, body, the workers' group. The webhook's whole Redis
# cost: refused if seen, else marked seen and appended to the inbox (which is also the replay
# log), atomically. A stream this creates gets the workers' group from its first entry, so no
# entry can fall before the group's start, whenever a worker first looks.
_ACCEPT_WEBHOOK = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local new = redis.call('EXISTS', KEYS[2]) == 0
if ARGV[2] == '' then
  redis.call('XADD', KEYS[2], '*', 'merchant', ARGV[3], 'event', ARGV[4],
             'delivery', ARGV[5], 'trace_id', ARGV[6], 'body', ARGV[7])
else
  redis.call('XADD', KEYS[2], 'MINID', ARGV[2], '*', 'merchant', ARGV[3], 'event', ARGV[4],
             'delivery', ARGV[5], 'trace_id', ARGV[6], 'body', ARGV[7])
end
if new then redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[8], '0') end
return 1
"""


def _event_job(
    delivery: str, body: bytes, trace_id: str, seen_key: str, pool: ArqRedis
) -> list[Any]:
    """`_ENQUEUE_EVENT` with its KEYS and ARGV, for one delivery."""
    job_id = f"evt:{delivery}"
    now = timestamp_ms()
    job = serialize_job(PROCESS_EVENT, (body, delivery, trace_id), {}, None, now)
    return [
        _ENQUEUE_EVENT,
        4,
        seen_key,
        job_key_prefix + job_id,
        result_key_prefix + job_id,
        pool.default_queue_name,
        job,
        str(pool.expires_extra_ms),
        str(now),
        job_id,
    ]


class EventWriter:
    """The webhook path's writes: each delivery is one atomic call (`_ACCEPT_WEBHOOK` into the
    inbox, or `_ENQUEUE_EVENT` for an app event's job), sent through the pool's auto-pipeline
    (service/autopipe.py): under a burst, the deliveries of one event-loop turn share a round
    trip (group commit). Each still gets its own answer: a Redis error fails exactly the
    deliveries of that write (they answer 503; Salla re-sends).
    """

    def __init__(self, pool: ArqRedis) -> None:
        self.pool = pool

    async def accept(
        self,
        *,
        merchant: int,
        event: str,
        delivery: str,
        body: bytes,
        trace_id: str,
        seen_key: str,
        seen_ttl_s: int,
        retention_days: int,
    ) -> bool:
        """Persist one delivery in the inbox; False when it was accepted before."""
        minid = (
            str(int((time.time() - retention_days * 86400) * 1000)) if retention_days > 0 else ""
        )
        return await self._submit(
            [
                _ACCEPT_WEBHOOK,
                2,
                seen_key,
                WEBHOOK_STREAM,
                str(seen_ttl_s),
                minid,
                str(merchant),
                event,
                delivery,
                trace_id,
                body,
                INBOX_GROUP,
            ]
        )

    async def enqueue(self, delivery: str, body: bytes, trace_id: str, *, seen_key: str) -> bool:
        """Persist one delivery as its own arq job (app lifecycle events); False when it is
        queued or was processed already (the worker sets `seen_key` once it is processed)."""
        return await self._submit(_event_job(delivery, body, trace_id, seen_key, self.pool))

    async def _submit(self, call: list[Any]) -> bool:
        return bool(await autopipe.auto(self.pool).execute("EVAL", *call))


#: The flush job this process last enqueued per store. Asking arq again for the same window is
#: a no-op (the job id exists) that costs four round trips; events of a busy store ask often.
_last_flush: dict[int, str] = {}


async def enqueue_flush(
    pool: ArqRedis, merchant: int, window_s: float, *, delay_s: float = 0.0
) -> None:
    """Schedule one flush per store per batch window; grants of that window share it."""
    at = time.time() + max(delay_s, 0.0)
    if window_s > 0:
        window = math.ceil(at / window_s)
        run_at = window * window_s
        job_id = f"flush:{merchant}:{window}"
        if _last_flush.get(merchant) == job_id:  # this process already asked for this window
            return
        _last_flush[merchant] = job_id
    else:
        run_at = at
        job_id = f"flush:{merchant}:{int(at * 1000)}"
    await pool.enqueue_job(
        FLUSH, merchant, _job_id=job_id, _defer_by=max(0.0, run_at - time.time())
    )


async def enqueue_reconcile(pool: ArqRedis, merchant: int, delay_s: float = 0.0) -> None:
    """One reconcile job per store per 10 seconds (the sweep cron is the backstop)."""
    at = time.time() + delay_s
    await pool.enqueue_job(
        RECONCILE, merchant, _job_id=f"reconcile:{merchant}:{int(at // 10)}", _defer_by=delay_s
    )
