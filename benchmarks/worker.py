"""One worker process, from persisted webhooks to queued grants: events per second.

Deliveries are persisted exactly as the web process persists them (the same atomic write to
the inbox), then one `salla-rewards worker` process is started and timed from its first read of
the inbox until every event has become a pending grant in the ledger. The batch window is set
long, so no flush runs (and no HTTP call is made) while it is measured: this is the rules +
ledger + queue path.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from arq.worker import func
from redis.asyncio import Redis

from benchmarks.ingest import ROOT, SAMPLE, peak_rss_mib
from service import ingest, keys, queue
from service.ingest import ensure_group
from service.keys import WEBHOOK_STREAM
from service.webhooks import delivery_id, read_head


def order_bodies(events: int, stores: int) -> list[bytes]:
    """Completed orders, each its own order and customer, spread over `stores` stores."""
    doc = json.loads(SAMPLE)
    out = []
    for n in range(events):
        doc["merchant"] = 1_000_000 + n % stores
        doc["data"]["id"] = n
        doc["data"]["order"]["id"] = n
        doc["data"]["order"]["customer"]["id"] = 500_000 + n
        out.append(json.dumps(doc, ensure_ascii=False).encode())
    return out


async def _noop(ctx: dict[str, Any], *args: Any) -> None:
    return None


async def arq_ceiling(redis_url: str, jobs: int = 5000) -> int:
    """Jobs/s of an arq worker whose job does nothing, with our job's arguments and settings:
    the queue's own ceiling for one process, which one job per webhook cannot exceed."""
    import uvloop
    from arq import Worker

    async def run() -> int:
        settings = queue.redis_settings(redis_url)
        pool = await queue.connect(redis_url)
        await pool.flushall()
        for start in range(0, jobs, 500):
            await asyncio.gather(
                *(
                    queue.enqueue(pool, queue.FLUSH, SAMPLE, f"d{n}", "t", job_id=f"e{n}")
                    for n in range(start, start + 500)
                )
            )
        worker = Worker(
            functions=[func(_noop, name=queue.FLUSH)],
            redis_settings=settings,
            job_serializer=queue.encode_job,
            job_deserializer=queue.decode_job,
            burst=True,
            max_jobs=50,
            poll_delay=0.02,
            keep_result=0,
            handle_signals=False,
        )
        started = time.perf_counter()
        await worker.main()
        elapsed = time.perf_counter() - started
        await worker.close()
        await pool.flushall()
        await pool.aclose()
        return round(jobs / elapsed)

    # A fresh uvloop loop in a thread, as the worker process runs one.
    return await asyncio.to_thread(uvloop.run, run())


async def settle_aof(redis: Redis) -> None:
    """Rewrite Redis's AOF now and wait for it: after the ingest runs' writes, Redis would
    otherwise fork to rewrite it during this measurement, on the same two cores. A rewrite
    Redis started on its own first is waited for (Redis refuses a second one meanwhile)."""
    await _rewrite_done(redis)
    await redis.bgrewriteaof()  # type: ignore[no-untyped-call]
    await _rewrite_done(redis)


async def _rewrite_done(redis: Redis) -> None:
    for _ in range(600):
        info = await redis.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        await asyncio.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_worker(redis_url: str, events: int = 6000, stores: int = 20) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    await settle_aof(redis)
    pool = await queue.connect(redis_url)
    await ensure_group(pool)
    writer = ingest.EventWriter(pool, seen_ttl_s=3600, retention_days=7)
    bodies = order_bodies(events, stores)
    for start in range(0, events, 500):
        await asyncio.gather(
            *(
                writer.accept(
                    merchant=env.merchant,
                    event=env.event,
                    delivery=delivery,
                    body=body,
                    trace_id="bench",
                )
                for body in bodies[start : start + 500]
                for env in (read_head(body),)
                for delivery in (delivery_id(env.merchant, env.event, body),)
            )
        )
    await writer.aclose()
    await pool.aclose()
    if await redis.xlen(WEBHOOK_STREAM) != events:
        raise RuntimeError("the worker benchmark could not persist its events")
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SALLA_WEBHOOK_SECRET": "bench-webhook-secret",
        "BATCH_WINDOW_S": "600",
        "WORKER_METRICS_PORT": "0",
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
        "LOG_FORMAT": "json",
    }
    worker = subprocess.Popen(  # noqa: ASYNC220 - our own interpreter and module
        [sys.executable, "-m", "service", "worker"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    merchants = [1_000_000 + s for s in range(stores)]
    try:
        started = None
        cpu_at_start = 0.0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            (group,) = await redis.xinfo_groups(WEBHOOK_STREAM)
            if started is None and group["last-delivered-id"] != "0-0":
                started = time.perf_counter()
                cpu_at_start = _cpu_seconds(worker.pid)

            async with redis.pipeline(transaction=False) as pipe:
                for merchant in merchants:
                    pipe.zcard(keys.grant_set("pending", merchant))
                pending = sum(await pipe.execute())
            if pending >= events:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - (started or time.perf_counter())
        cpu = _cpu_seconds(worker.pid) - cpu_at_start
        rss = peak_rss_mib(worker.pid)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
    kept = int(await redis.xlen(WEBHOOK_STREAM))
    stream_bytes = int(await redis.memory_usage(WEBHOOK_STREAM) or 0)
    await redis.flushall()
    await redis.aclose()
    if pending != events:
        raise RuntimeError(f"the worker queued {pending} grants for {events} events")
    return {
        "events_per_s": round(events / elapsed),
        "events": events,
        "stores": stores,
        "worker_cpu_ms_per_event": round(cpu / events * 1000, 3),
        "arq_noop_jobs_per_s_one_process": await arq_ceiling(redis_url),
        "worker_peak_rss_mib": rss,
        "redis_bytes_per_kept_webhook": round(stream_bytes / max(kept, 1)),
        "method": "one worker process reading the inbox 100 webhooks at a time, LOG_LEVEL=INFO, "
        "no flush during the run",
    }
