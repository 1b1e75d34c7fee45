"""arq `WorkerSettings`: jobs, the sweep cron, and resources built once in startup.

Every job can be made again from the state store: the sweep queues a flush for every store with
due grants and a reconciliation for every store with unknown outcomes, and the orders
reconciliation scheduler queues again a run that started and is neither finished nor on the
queue. A failover of the queue's Redis that loses its last writes (service/queue.py) costs a
delay of a few seconds, never a grant.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
from typing import Any

from arq import cron
from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Function, Retry, Worker, func
from prometheus_client import start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import arq_log, keys, ledger, metrics, queue, state_store, sweeper
from service.delivery.flush import flush
from service.delivery.reconcile import reconcile
from service.delivery.refresh import refresh_expiring_tokens
from service.logging import configure_logging, get_logger
from service.orders import reconcile as orders_reconcile
from service.orders import schedule, truth
from service.settings import Settings
from service.worker_resources import CTX_KEY, WorkerResources, of

log = get_logger("service.worker")

_REDIS_TRANSIENT = (RedisConnectionError, RedisTimeoutError, *state_store.FAILING_OVER)


def _next_run_tries_again(periodic: WorkerCoroutine) -> WorkerCoroutine:
    """A cron job whose Redis is unreachable or failing over (a moment, in a failover) skips
    this run with a warning: it redoes everything at its next run, so the failure is no error
    (arq would log `job_failed` with a traceback)."""

    @functools.wraps(periodic)  # arq names the job after it: `cron:sweep`
    async def run(ctx: dict[Any, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await periodic(ctx, *args, **kwargs)
        except _REDIS_TRANSIENT as exc:
            log.warning("cron_redis_unavailable", job=periodic.__qualname__, error=repr(exc))
            return None

    return run


async def _flush_job(ctx: dict[str, Any], merchant: int) -> Any:
    try:
        return await flush(of(ctx).delivery, merchant)
    except _REDIS_TRANSIENT as exc:
        raise Retry(defer=min(2 ** ctx["job_try"], 60)) from exc


async def _reconcile_job(ctx: dict[str, Any], merchant: int) -> Any:
    try:
        return await reconcile(of(ctx).delivery, merchant)
    except _REDIS_TRANSIENT as exc:
        raise Retry(defer=min(2 ** ctx["job_try"], 60)) from exc


async def _order_truth_job(ctx: dict[str, Any], merchant: int, order_id: int) -> Any:
    try:
        return await truth.settle_order(of(ctx).orders, merchant, order_id, job_try=ctx["job_try"])
    except _REDIS_TRANSIENT as exc:
        raise Retry(defer=min(2 ** ctx["job_try"], 60)) from exc


async def _orders_reconcile_job(ctx: dict[str, Any], merchant: int, slot: int = 0) -> Any:
    deps = of(ctx).orders
    try:
        report = await orders_reconcile.run_store(deps, merchant)
        if slot:  # the scheduler's run of this period is done (see `schedule_orders_reconcile`)
            every = deps.processing.settings.orders_reconcile_every_s
            await deps.redis.set(keys.orders_reconcile_done(merchant), str(slot), ex=every * 2)
    except _REDIS_TRANSIENT as exc:
        raise Retry(defer=min(2 ** ctx["job_try"], 60)) from exc
    return report.as_log()


async def schedule_orders_reconcile(ctx: dict[str, Any]) -> int:
    """Start the stores' reconciliations that are due (service/orders/schedule.py)."""
    done = await schedule.start_due(of(ctx).delivery, ledger.now_ms() // 1000)
    return done.started


async def refresh_tokens(ctx: dict[str, Any]) -> int:
    return await refresh_expiring_tokens(of(ctx).delivery)


async def sweep(ctx: dict[str, Any]) -> dict[str, int]:
    """Recover dead workers' claims, start due flushes, reconcile unknown outcomes, a bounded
    share of the stores a cycle (service/sweeper.py)."""
    return (await sweeper.run(of(ctx).delivery)).as_dict()


def build_worker_settings(settings: Settings, redis_url: str) -> dict[str, Any]:
    """The keyword arguments of `arq.Worker` for this service (also used by tests). `redis_url`
    is the state store; arq's queue is `queue.target(settings, redis_url)`."""
    arq_log.install()  # arq's job lines: named events, no job arguments, cron runs at DEBUG

    async def startup(ctx: dict[str, Any]) -> None:
        if CTX_KEY in ctx:  # `run` started arq's loop again after a Redis outage
            log.info("worker_resumed")
            return
        configure_logging(settings.log_format, settings.log_level)
        ctx[CTX_KEY] = resources = await WorkerResources.open(settings, redis_url, ctx["redis"])
        if settings.worker_metrics_port:
            try:
                start_http_server(settings.worker_metrics_port, registry=metrics.REGISTRY)
            except OSError as exc:  # e.g. several workers on one host: the first one serves
                log.warning(
                    "metrics_port_unavailable", port=settings.worker_metrics_port, error=str(exc)
                )
        # As in the web process: start-up objects (modules, rules, settings) never become
        # garbage; out of the collector's reach, its full collections stay short.
        gc.collect()
        gc.freeze()
        log.info(
            "worker_started",
            rules=len(resources.rules.current.rules),
            rule_files=len(resources.rules.current.files),
            salla_api_base=settings.salla_api_base,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        if CTX_KEY in ctx:
            await of(ctx).close()

    functions: list[Function] = [
        func(_flush_job, name=queue.FLUSH, keep_result=0, max_tries=10),
        func(_reconcile_job, name=queue.RECONCILE, keep_result=0, max_tries=10),
        # Deferring for the plan bucket counts as a try: allow a long wait.
        func(_order_truth_job, name=queue.ORDER_TRUTH, keep_result=0, max_tries=200),
        func(_orders_reconcile_job, name=queue.ORDERS_RECONCILE, keep_result=0, max_tries=200),
    ]
    sweep_seconds = set(range(0, 60, 5))
    return {
        "functions": functions,
        "cron_jobs": [
            cron(
                _next_run_tries_again(sweep), second=sweep_seconds, run_at_startup=True, unique=True
            ),
            cron(
                _next_run_tries_again(refresh_tokens),
                minute=set(range(0, 60, 10)),
                second=30,
                unique=True,
            ),
            cron(
                _next_run_tries_again(schedule_orders_reconcile),
                second=45,
                unique=True,
                run_at_startup=True,
            ),
        ],
        "redis_settings": queue.redis_settings(
            queue.target(settings, redis_url), ride_out_outages=True
        ),
        "job_serializer": queue.encode_job,
        "job_deserializer": queue.decode_job,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "job_timeout": settings.job_timeout_s,
        "keep_result": 0,
        # A job's result can hold what its arguments held (tokens); arq's line for it is off.
        "log_results": False,
        # arq starts at most max_jobs per poll and polls every poll_delay: the product bounds a
        # worker's events/s (20 / 0.5 s would be 40/s). 50 every 20 ms costs an idle worker
        # 50 cheap Redis calls a second.
        "max_jobs": 50,
        "poll_delay": 0.02,
        "handle_signals": True,
        "health_check_interval": settings.worker_health_interval_s,
    }


def create_worker(settings: Settings, redis_url: str, **overrides: Any) -> Worker:
    return Worker(**{**build_worker_settings(settings, redis_url), **overrides})


def run_worker(worker: Worker) -> None:
    """`Worker.run`, kept alive through a Redis outage of any length: when arq's loop ends on
    a lost connection (its poll, or a job's bookkeeping, failed after redis-py's retries),
    wait for Redis and start the loop again (`Worker.async_run`) in the same process, with
    the same resources (`startup` runs once) and the jobs in flight left running. A signal
    (SIGTERM, Ctrl-C) stops it as it stops arq, waiting or not."""
    supervisor = worker.loop.create_task(_ride_out_outages(worker))

    def stop(_signal: signal.Signals) -> None:  # arq's own stop has cancelled its loop
        supervisor.cancel()

    worker.on_stop = stop
    try:
        worker.loop.run_until_complete(supervisor)
    except asyncio.CancelledError:  # stopped by a signal
        pass
    finally:
        worker.loop.run_until_complete(_settle_cancelled_jobs(worker))
        try:
            worker.loop.run_until_complete(worker.close())
        except _REDIS_TRANSIENT as exc:  # stopping while Redis is away: nothing left to tidy
            log.warning("worker_stopped_without_redis", error=repr(exc))


async def _settle_cancelled_jobs(worker: Worker) -> None:
    """Let the jobs a signal cancelled finish cancelling, and forget those that ended
    cancelled: arq's `close()` gathers its tasks without `return_exceptions`, so one job
    cancelled outside arq's own try (reading its data, say: a SIGTERM just after start-up)
    re-raised `CancelledError` there, skipped the shutdown (inbox, HTTP client, pool) and
    ended the process with status 1. They run again: arq re-queues what it did not finish."""
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    for job_id, task in list(worker.tasks.items()):
        if task.cancelled():
            del worker.tasks[job_id]


async def _ride_out_outages(worker: Worker) -> None:
    while True:
        try:
            await worker.async_run()
            return
        except _REDIS_TRANSIENT as exc:
            if worker.pool is None:  # Redis was never reached: a start-up failure, not an outage
                raise
            log.warning("worker_redis_unavailable", error=repr(exc))
        await wait_for_redis(worker.pool)


async def wait_for_redis(pool: ArqRedis) -> None:
    """Until Redis answers PING with PONG. Anything else that answers is not Redis: while
    Redis is down another process may take its port, or a reconnecting client's socket may
    connect to itself (TCP's simultaneous open, when its local port is the one it dials) and
    read its own PING back."""
    wait_s = 0.5
    while True:
        await asyncio.sleep(wait_s)
        try:
            # Bounded: arq's pool has no read timeout, and a reply may never come on a
            # connection made while Redis was going down.
            answered = await asyncio.wait_for(pool.ping(), timeout=5.0)
        except (*_REDIS_TRANSIENT, TimeoutError):
            answered = False
        if answered is not True:  # no PONG: not Redis, or not yet (see the docstring)
            wait_s = min(wait_s * 2, 2.0)
            continue
        log.info("worker_redis_back")
        return


async def worker_alive(where: queue.QueueTarget) -> bool:
    """Whether some worker reported in within its health interval (arq's health-check key, on
    the queue's Redis)."""
    from arq.constants import default_queue_name, health_check_key_suffix

    pool = await queue.connect(where, retry_connect=False)
    try:
        return bool(await pool.exists(default_queue_name + health_check_key_suffix))
    finally:
        await pool.aclose()
