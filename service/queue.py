"""The thin layer over arq: job names, job ids, the job format and enqueueing. Nothing else
imports arq's API.

arq runs every job at least once; job ids (`evt:<delivery>`, `flush:<store>:<window>`) avoid
needless duplicates, and the ledger makes the rest harmless.

Jobs are msgpack, never pickle (arq's default): a job is data read from Redis, and unpickling
it would run whatever callable it names, so anyone able to write to Redis could run commands
as the worker. msgpack decodes to plain values only (no extension types are accepted); a job
that does not decode is refused, logged (`job_refused`) and dropped, never run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from decimal import Decimal
from typing import Any

import msgspec
import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import autopipe, keys, process_state, redis_url
from service.errors import JobRefused
from service.logging import get_logger

log = get_logger("service.queue")

PROCESS_EVENT = "process_event"
#: `<prefix><delivery>`: set once a delivery is accepted (inbox) or processed (app event).
SEEN_PREFIX = keys.SEEN_PREFIX
#: The inbox (service/inbox.py): webhooks accepted for the rules, also kept for replay.
WEBHOOK_STREAM = keys.WEBHOOK_STREAM
#: The consumer group the workers read the inbox as.
INBOX_GROUP = "workers"
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


def redis_settings(url: str, *, ride_out_outages: bool = False) -> RedisSettings:
    """arq's connection settings for `url` (see service/redis_url.py). `ride_out_outages` (the
    worker): a command that meets a lost or refused connection is retried with backoff (for
    0.7 s to about 3 s), so a Redis blip costs in-flight jobs a pause rather than a failure.
    OSError is named because redis-py retries connecting only for the errors named here, and
    a refused connect is a plain `ConnectionRefusedError`; a command retries its connect too,
    so the two budgets multiply: both are kept small. Longer outages end arq's loop;
    `worker.run_worker` waits for Redis and starts it again."""
    settings = redis_url.arq_settings(url)
    if ride_out_outages:
        settings.retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
        settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
        settings.conn_retries = 30  # arq's start-up: Redis may come up after the worker
    return settings


async def connect(url: str) -> ArqRedis:
    """An arq pool that writes and reads jobs as msgpack (every process that enqueues)."""
    return await create_pool(
        redis_settings(url),
        job_serializer=encode_job,
        job_deserializer=decode_job,
    )


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


# KEYS: the inbox stream, then each delivery's "seen" key; ARGV: seen TTL s, MINID ("" = keep
# all), the workers' group, then per delivery: its JSON header [merchant, event, delivery,
# trace id] and its body (two arguments, not five: packing each one costs the web process).
# Returns 1 (accepted) or 0 (seen before) per delivery, in order. The webhook's whole Redis
# cost, for a group of deliveries at once (`EventWriter`): each is refused if seen, else marked
# seen and appended to the inbox (which is also the replay log); a script runs atomically. A
# stream this creates gets the workers' group with its first entry, so no entry can fall before
# the group's start, whenever a worker first looks.
ACCEPT_WEBHOOKS = """
local stream, ttl, minid = KEYS[1], ARGV[1], ARGV[2]
local new = redis.call('EXISTS', stream) == 0
local out = {}
for i = 2, #KEYS do
  local a = 4 + (i - 2) * 2
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    local h = cjson.decode(ARGV[a])
    if minid == '' then
      redis.call('XADD', stream, '*', 'merchant', h[1], 'event', h[2],
                 'delivery', h[3], 'trace_id', h[4], 'body', ARGV[a + 1])
    else
      redis.call('XADD', stream, 'MINID', minid, '*', 'merchant', h[1], 'event', h[2],
                 'delivery', h[3], 'trace_id', h[4], 'body', ARGV[a + 1])
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if new and redis.call('EXISTS', stream) == 1 then
  redis.call('XGROUP', 'CREATE', stream, ARGV[3], '0')
end
return out
"""

#: Deliveries per `ACCEPT_WEBHOOKS` call at most: more waiting go in the next call.
ACCEPT_BATCH = 256


def _settle(batch: list[tuple[str, list[Any], asyncio.Future[Any]]], results: list[Any]) -> None:
    """Give each waiting delivery its answer: accepted (True), seen before, or the error."""
    for (_, _, future), result in zip(batch, results, strict=True):
        if future.done():  # its caller was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(bool(result))


class EventWriter:
    """The webhook path's writes. Inbox deliveries are group-committed: one `ACCEPT_WEBHOOKS`
    call at a time, on a connection of its own, carries every delivery that arrived while the
    previous call was out (a burst's deliveries share a round trip and a script run; a lone
    one goes at once). Per delivery, the web process pays a list append and an awaited future,
    not a Redis command. App events (few; each its own arq job) go through the pool's
    auto-pipeline. Each delivery still gets its own answer: a Redis error fails exactly the
    deliveries of that call (they answer 503; Salla re-sends, and the "seen" mark makes any that
    did land a duplicate, not a loss).
    """

    def __init__(self, pool: ArqRedis, *, seen_ttl_s: int, retention_days: int) -> None:
        self.pool = pool
        self.seen_ttl_s = seen_ttl_s
        self.retention_days = retention_days
        # A connection held for the writer: no pool checkout (and its liveness probe) per call.
        self._conn = pool.client()
        self._accept = self._conn.register_script(ACCEPT_WEBHOOKS)  # EVALSHA; loads if missing
        self._waiting: list[tuple[str, list[Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def accept(
        self, *, merchant: int, event: str, delivery: str, body: bytes, trace_id: str
    ) -> asyncio.Future[Any]:
        """Persist one delivery in the inbox; the future's result is False when it was accepted
        before, true otherwise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        header = orjson.dumps([str(merchant), event, delivery, trace_id])
        self._waiting.append((SEEN_PREFIX + delivery, [header, body], future))
        if self._sender is None:  # its first step runs after this loop turn's other requests
            self._sender = loop.create_task(self._send_waiting())
        return future

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:ACCEPT_BATCH]
                del self._waiting[:ACCEPT_BATCH]
                await self._send(batch)
        finally:
            self._sender = None
            # Stopped (the process is shutting down): nobody will send these; say so.
            for _, _, future in self._waiting:
                if not future.done():
                    future.set_exception(RedisConnectionError("the event writer stopped"))
            self._waiting.clear()

    async def _send(self, batch: list[tuple[str, list[Any], asyncio.Future[Any]]]) -> None:
        keys: list[Any] = [WEBHOOK_STREAM]
        args: list[Any] = [self.seen_ttl_s, self._minid(), INBOX_GROUP]
        for seen_key, fields, _ in batch:
            keys.append(seen_key)
            args += fields
        try:
            try:
                results: list[Any] = await self._accept(keys=keys, args=args)
            except RedisConnectionError:
                # The held connection went stale (say Redis restarted since the last call): once
                # more, on a new one. Safe even if the first call ran: "seen" marks make a
                # delivery that landed answer as a duplicate, never land twice.
                results = await self._accept(keys=keys, args=args)
        except Exception as exc:  # nothing of this call is known to be persisted: all fail
            results = [exc] * len(batch)
        except BaseException:  # cancelled: the process is stopping
            _settle(batch, [RedisConnectionError("the event writer stopped")] * len(batch))
            raise
        _settle(batch, results)

    async def aclose(self) -> None:
        """Give the writer's connection back to the pool."""
        await self._conn.aclose()

    def _minid(self) -> str:
        """The oldest entry id retention keeps ("" keeps all)."""
        if self.retention_days <= 0:
            return ""
        return str(int((time.time() - self.retention_days * 86400) * 1000))

    async def enqueue(self, delivery: str, body: bytes, trace_id: str) -> bool:
        """Persist one delivery as its own arq job (app lifecycle events); False when it is
        queued or was processed already (the worker marks it seen once it is processed).

        Through arq's public `enqueue_job` (about four round trips: the "seen" check, then
        arq's WATCH, EXISTS and MULTI/EXEC) rather than a script writing arq's job format by
        hand in one: that format is arq's private business and changes with it. The cost is
        paid by app lifecycle events only (a handful per store's lifetime); every webhook for
        the rules still costs its share of one group-committed script call (`accept`). The
        check and the enqueue are two steps: a duplicate that lands between them runs the job
        a second time, which lifecycle handlers (upserts, ordered by event time) allow.
        """
        if await autopipe.auto(self.pool).execute("EXISTS", SEEN_PREFIX + delivery):
            return False
        return await enqueue(
            self.pool, PROCESS_EVENT, body, delivery, trace_id, job_id=f"evt:{delivery}"
        )


async def enqueue_flush(
    pool: ArqRedis, merchant: int, window_s: float, *, delay_s: float = 0.0
) -> None:
    """Schedule one flush per store per batch window; grants of that window share it."""
    at = time.time() + max(delay_s, 0.0)
    if window_s > 0:
        window = math.ceil(at / window_s)
        run_at = window * window_s
        job_id = f"flush:{merchant}:{window}"
        # Asking arq again for the same window is a no-op that costs four round trips, and
        # events of a busy store ask often: once per window per process.
        if process_state.last_flush.get(merchant) == job_id:
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


async def enqueue_orders_reconcile(pool: ArqRedis, merchant: int, *, slot: int) -> None:
    """One reconciliation run of a store per period (`slot`: the period's number)."""
    await enqueue(pool, ORDERS_RECONCILE, merchant, job_id=f"{ORDERS_RECONCILE}:{merchant}:{slot}")
