"""The thin layer over arq: job names, job ids and enqueueing. Nothing else imports arq's API.

arq runs every job at least once; job ids (`evt:<delivery>`, `flush:<store>:<window>`) avoid
needless duplicates, and the ledger makes the rest harmless.
"""

from __future__ import annotations

import math
import time

from arq.connections import ArqRedis, RedisSettings, create_pool

PROCESS_EVENT = "process_event"
FLUSH = "flush"
RECONCILE = "reconcile"


def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


async def connect(url: str) -> ArqRedis:
    return await create_pool(redis_settings(url))


async def enqueue_event(pool: ArqRedis, delivery: str, body: bytes, trace_id: str) -> bool:
    """Persist one webhook delivery as a job; False when that delivery is already queued."""
    job = await pool.enqueue_job(PROCESS_EVENT, body, delivery, trace_id, _job_id=f"evt:{delivery}")
    return job is not None


async def enqueue_flush(
    pool: ArqRedis, merchant: int, window_s: float, *, delay_s: float = 0.0
) -> None:
    """Schedule one flush per store per batch window; grants of that window share it."""
    at = time.time() + max(delay_s, 0.0)
    if window_s > 0:
        window = math.ceil(at / window_s)
        run_at = window * window_s
        job_id = f"flush:{merchant}:{window}"
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
