"""The thin layer over arq: where the queue lives, job names, job ids, the job format and
enqueueing. Nothing else imports arq's API.

arq runs every job at least once; job ids (`flush:<store>:<window>`, `reconcile:<store>:<10 s>`)
avoid needless duplicates, and the ledger makes the rest harmless.

The queue may live on a Redis of its own (`QUEUE_REDIS_URL`), standalone or managed by Sentinel
(`QUEUE_REDIS_SENTINELS`): see `QueueTarget`. Nothing on it is the only copy of anything. A
failover with asynchronous replication can lose the last writes of the old master, so every job
can be made again from the state on `REDIS_URL`: flushes and reconciliations by the worker's
sweep (service/worker.py), app lifecycle events are not jobs at all (an inbox stream of their
own, service/ingest.py).

Jobs are msgpack, never pickle (arq's default): a job is data read from Redis, and unpickling
it would run whatever callable it names, so anyone able to write to Redis could run commands
as the worker. msgpack decodes to plain values only (no extension types are accepted); a job
that does not decode is refused, logged (`job_refused`) and dropped, never run.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job, JobStatus
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import process_state, redis_url
from service.errors import JobRefused
from service.logging import get_logger

if TYPE_CHECKING:
    from service.settings import Settings

log = get_logger("service.queue")

FLUSH = "flush"
RECONCILE = "reconcile"
#: Ask Salla's orders API what an order is (service/orders/truth.py).
ORDER_TRUTH = "order_truth"
#: Compare a store's recent orders with the ledger (service/orders/reconcile.py).
ORDERS_RECONCILE = "orders_reconcile"


def _plain(value: Any) -> Any:
    """What msgpack has no type for. arq records a failed job's exception as its result: it
    is kept as text. A job's arguments are only ever plain values: anything else fails the
    enqueue loudly instead of reaching the worker as something else."""
    if isinstance(value, BaseException):
        return repr(value)
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"a job cannot carry {type(value).__name__}: use str, int, bytes, list, dict")


_encoder = msgspec.msgpack.Encoder(enc_hook=_plain)
_decoder = msgspec.msgpack.Decoder()  # plain values only: msgpack extension types are refused


def encode_job(job: dict[str, Any]) -> bytes:
    """arq's `job_serializer`: a job (or a job's result) as msgpack."""
    return _encoder.encode(job)


def decode_job(data: bytes) -> dict[str, Any]:
    """arq's `job_deserializer`. Data that is not a msgpack map is refused, with a line that
    says what it looked like; arq then logs the job id with this error and drops the job."""
    try:
        job = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        # Pickles from protocol 2 on start with 0x80 (PROTO): arq's own default format, so an
        # earlier version of this service, or someone who can write to Redis.
        kind = "a pickle" if data[:1] == b"\x80" else "not msgpack"
        why = (
            f"job data is {kind} ({len(data)} bytes), not this service's msgpack; it was not "
            "run: jobs are never unpickled (written by an earlier version, or by someone with "
            "write access to Redis)"
        )
        log.error("job_refused", why=why, error=str(exc))
        raise JobRefused(why) from None
    if not isinstance(job, dict):
        why = f"job data is msgpack but not a job (a {type(job).__name__}); it was not run"
        log.error("job_refused", why=why)
        raise JobRefused(why)
    return job


@dataclass(frozen=True, slots=True)
class QueueTarget:
    """Where arq's queue lives: a standalone Redis at `url`, or, with `sentinels`, the master
    the Sentinels know as `master` (then `url` gives only the user, password and db)."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""

    def __str__(self) -> str:
        if self.sentinels:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"Sentinel master {self.master!r} via {hosts}"
        return redis_url.redact(self.url)


def target(settings: Settings, state_url: str) -> QueueTarget:
    """The queue of this deployment: `QUEUE_REDIS_URL` / `QUEUE_REDIS_SENTINELS`, else the state
    store's own Redis (`state_url`, which may be the embedded one)."""
    sentinels = tuple(settings.queue_sentinels)
    url = settings.queue_redis_url or ("redis://queue/0" if sentinels else state_url)
    return QueueTarget(url, sentinels, settings.queue_redis_sentinel_master.strip())


def redis_settings(where: QueueTarget | str, *, ride_out_outages: bool = False) -> RedisSettings:
    """arq's connection settings for the queue (a URL: see service/redis_url.py).
    `ride_out_outages` (the worker): a command that meets a lost or refused connection is
    retried with backoff (for 0.7 s to about 3 s), so a Redis blip costs in-flight jobs a pause
    rather than a failure. OSError is named because redis-py retries connecting only for the
    errors named here, and a refused connect is a plain `ConnectionRefusedError`; a command
    retries its connect too, so the two budgets multiply: both are kept small. Longer outages
    end arq's loop; `worker.run_worker` waits for Redis and starts it again.

    With Sentinels, arq's own Sentinel mode (`RedisSettings.sentinel`): it asks the Sentinels
    for the master on every new connection and drops a connection whose server turned replica
    (redis-py's `SentinelConnectionPool`), so after a failover arq's loop fails once and
    `run_worker` starts it again on the new master. Where arq falls short (arq 0.28,
    `create_pool`): in Sentinel mode it passes only db, user, password and `ssl` on, so the
    connect timeout, the retry policy below, `max_connections` and every TLS certificate option
    are dropped (TLS is refused by the settings rather than half applied), and the Sentinels
    themselves are asked without a password (Sentinels with `requirepass` are not supported)."""
    where = where if isinstance(where, QueueTarget) else QueueTarget(where)
    settings = redis_url.arq_settings(where.url)
    if where.sentinels:
        settings.host = list(where.sentinels)
        settings.sentinel = True
        settings.sentinel_master = where.master
    if ride_out_outages:
        settings.retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
        settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
        settings.conn_retries = 30  # arq's start-up: Redis may come up after the worker
    return settings


async def connect(where: QueueTarget | str, *, retry_connect: bool = True) -> ArqRedis:
    """An arq pool that writes and reads jobs as msgpack (every process that enqueues).
    `retry_connect` False: one try (a health check), not arq's five a second apart."""
    settings = redis_settings(where)
    if not retry_connect:
        settings.conn_retries = 0
    return await create_pool(settings, job_serializer=encode_job, job_deserializer=decode_job)


async def job_known(pool: ArqRedis, job_id: str) -> bool:
    """Whether arq has the job queued, deferred or running (a finished job is forgotten: the
    service keeps no results, so "unknown" is "finished" or "lost")."""
    return await Job(job_id, pool).status() is not JobStatus.not_found


async def enqueue(
    pool: ArqRedis,
    job: str,
    *args: Any,
    job_id: str,
    defer_s: float = 0.0,
    defer_until: dt.datetime | None = None,
) -> bool:
    """Queue `job(*args)` under `job_id`, through arq's public `enqueue_job`, to run after
    `defer_s` seconds (zero or less: now) or at `defer_until` (which wins). False when a job
    with this id is already queued or running. Arguments must be plain values (str, int,
    float, bytes, lists, dicts): they travel as msgpack."""
    queued = await pool.enqueue_job(
        job,
        *args,
        _job_id=job_id,
        _defer_by=None if defer_until is not None or defer_s <= 0 else defer_s,
        _defer_until=defer_until,
    )
    return queued is not None


async def enqueue_flush(
    pool: ArqRedis, merchant: int, window_s: float, *, delay_s: float = 0.0, recreate: bool = False
) -> None:
    """Schedule one flush per store per batch window; grants of that window share it.
    `recreate` (the sweep): ask arq even if this process queued this window's job already, as a
    queue failover may have lost it (arq refuses a job id it still has: harmless)."""
    at = time.time() + max(delay_s, 0.0)
    if window_s > 0:
        window = math.ceil(at / window_s)
        run_at = window * window_s
        job_id = f"flush:{merchant}:{window}"
        # Asking arq again for the same window is a no-op that costs four round trips, and
        # events of a busy store ask often: once per window per process.
        if process_state.last_flush.get(merchant) == job_id and not recreate:
            return
    else:
        run_at = at
        job_id = f"flush:{merchant}:{int(at * 1000)}"
    await enqueue(pool, FLUSH, merchant, job_id=job_id, defer_s=run_at - time.time())
    if window_s > 0:  # remembered once queued: a failed enqueue is tried again next time
        process_state.last_flush[merchant] = job_id


async def enqueue_reconcile(pool: ArqRedis, merchant: int, delay_s: float = 0.0) -> None:
    """One reconcile job per store per 10 seconds (the sweep cron is the backstop)."""
    at = time.time() + delay_s
    await enqueue(
        pool, RECONCILE, merchant, job_id=f"reconcile:{merchant}:{int(at // 10)}", defer_s=delay_s
    )


async def enqueue_order_truth(
    pool: ArqRedis, merchant: int, order_id: int, *, defer_s: float = 0.0
) -> bool:
    """Ask Salla about one order: one job per order at a time (`order_truth:<store>:<order>`).
    False when one is already queued or running (it reads the order's entry again before it
    commits, so it also covers the event that asked now)."""
    return await enqueue(
        pool,
        ORDER_TRUTH,
        merchant,
        order_id,
        job_id=f"{ORDER_TRUTH}:{merchant}:{order_id}",
        defer_s=defer_s,
    )


def orders_reconcile_id(merchant: int, slot: int) -> str:
    return f"{ORDERS_RECONCILE}:{merchant}:{slot}"


async def enqueue_orders_reconcile(pool: ArqRedis, merchant: int, *, slot: int) -> bool:
    """One reconciliation run of a store per period (`slot`: the period's number). False when
    arq has it already."""
    job_id = orders_reconcile_id(merchant, slot)
    return await enqueue(pool, ORDERS_RECONCILE, merchant, slot, job_id=job_id)
