"""Delivery figures against the sandbox, in one run (issue: delivery that never pays twice).

* calls made / the lower bound for a backlog of grants (target 1.00);
* throughput while a backlog exists, as a fraction of the configured rate limit (target 0.95+),
  and the share of calls answered 429 (target at most 1%);
* time from webhook to credited with no backlog: median, next to the batch window + 100 ms.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from service import keys, ledger, tokens
from service.app import create_app
from service.rules.engine import Outcome
from service.salla import TokenSet
from service.sandbox.app import Sandbox, create_sandbox_app
from service.settings import Settings
from service.webhooks import signed_headers
from service.worker import create_worker
from tests.support.servers import serve_in_thread

MERCHANT = 4242
SECRET = "bench-webhook-secret"  # noqa: S105 - a local benchmark secret
ROOT = Path(__file__).parent.parent


def _settings(sandbox_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "salla_webhook_secret": SECRET,
        "salla_api_base": sandbox_url,
        "salla_oauth_token_url": f"{sandbox_url}/oauth2/token",
        "log_level": "WARNING",
        "log_format": "json",
        "rules_path": ROOT / "rules",
        "batch_window_s": 0.25,
    }
    values.update(overrides)
    # Our plan bucket as large as the customers bucket under test: these figures are about the
    # customers bucket (loyalty calls take from both).
    if "rate_limit_requests" in values:
        values.setdefault("orders_rate_limit_requests", values["rate_limit_requests"])
        values.setdefault("orders_rate_limit_window_s", values.get("rate_limit_window_s", 600))
    return Settings(**values)


async def _run_worker(settings: Settings, redis_url: str) -> tuple[Any, asyncio.Task[Any]]:
    worker = create_worker(settings, redis_url, handle_signals=False, poll_delay=0.005)
    return worker, asyncio.create_task(worker.async_run())


async def _stop_worker(worker: Any, task: asyncio.Task[Any]) -> None:
    worker.burst = True
    worker.max_burst_jobs = 0
    await asyncio.wait_for(task, timeout=30)
    await worker.close()


async def _install(redis: Redis, box: Sandbox, **options: Any) -> None:
    if "rate_limit" in options:  # the plan bucket as large: the figures are the customers bucket's
        options.setdefault("plan_rate_limit", options["rate_limit"])
        options.setdefault("plan_rate_window_s", options["rate_window_s"])
    store = box.add_store(MERCHANT, **options)
    await tokens.save(
        redis,
        MERCHANT,
        TokenSet(store.access_token, store.refresh_token, int(store.access_expires_at)),
    )


async def calls_vs_lower_bound(redis_url: str, max_customers: int = 100) -> dict[str, Any]:
    rng = random.Random(1)
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    box = Sandbox(rate_limit=100_000, rate_window_s=60)
    with serve_in_thread(create_sandbox_app(box)) as url:
        await _install(redis, box, rate_limit=100_000, rate_window_s=60)
        groups: Counter[str] = Counter()
        for n in range(2000):
            reason = f"bonus {rng.randrange(7)}"
            groups[reason] += 1
            outcome = Outcome("b", "v", "grant", 10, reason, ("sms",), "b", scope=f"order:{n}")
            await ledger.apply_outcomes(redis, MERCHANT, [outcome], customer=100000 + n)
        bound = sum(math.ceil(size / max_customers) for size in groups.values())
        settings = _settings(
            url,
            max_customers_per_call=max_customers,
            rate_limit_requests=100_000,
            rate_limit_window_s=60,
        )
        worker, task = await _run_worker(settings, redis_url)
        deadline = time.monotonic() + 60
        store = box.stores[MERCHANT]
        while sum(store.balances.values()) < 20_000 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await _stop_worker(worker, task)
        calls = len(store.calls)
    await redis.aclose()
    return {
        "grants": 2000,
        "lower_bound_calls": bound,
        "calls": calls,
        "calls_over_lower_bound": round(calls / bound, 2),
    }


async def throughput_under_backlog(
    redis_url: str, per_s: int = 20, calls: int = 300
) -> dict[str, Any]:
    """A backlog of `calls` single-customer calls drained under a limit of `per_s` per second."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    window_s = 5.0
    box = Sandbox()
    with serve_in_thread(create_sandbox_app(box)) as url:
        await _install(redis, box, rate_limit=per_s * window_s, rate_window_s=window_s)
        for n in range(calls):  # distinct points: every grant is its own call
            outcome = Outcome("b", "v", "grant", 1 + n, "bonus", ("sms",), "b", scope=f"order:{n}")
            await ledger.apply_outcomes(redis, MERCHANT, [outcome], customer=200000 + n)
        settings = _settings(
            url,
            rate_limit_requests=int(per_s * window_s),
            rate_limit_window_s=window_s,
            batches_per_flush=20,
        )
        # Drain the bucket's initial burst allowance first, so the figure is the steady rate.
        worker, task = await _run_worker(settings, redis_url)
        store = box.stores[MERCHANT]
        burst = int(per_s * window_s)
        while len(store.calls) < burst:
            await asyncio.sleep(0.01)
        started, start_calls = time.monotonic(), len(store.calls)
        while len(store.calls) < calls and time.monotonic() - started < 120:
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - started
        steady = len(store.calls) - start_calls
        await _stop_worker(worker, task)
        limited = store.counters.get("rate_limited", 0)
    await redis.aclose()
    return {
        "configured_per_s": per_s,
        "achieved_per_s": round(steady / elapsed, 2),
        "fraction_of_limit": round(steady / elapsed / per_s, 3),
        "answered_429_share": round(limited / max(1, len(store.calls) + limited), 4),
    }


async def webhook_to_credited(redis_url: str, samples: int = 20) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    box = Sandbox()
    fixture = json.loads((ROOT / "tests/fixtures/order.status.updated.json").read_bytes())
    with serve_in_thread(create_sandbox_app(box)) as url:
        settings = _settings(url)
        await _install(redis, box)
        with serve_in_thread(create_app(settings, redis_url)) as web_url:
            worker, task = await _run_worker(settings, redis_url)
            latencies = []
            async with httpx.AsyncClient() as client:
                for n in range(samples):
                    fixture["merchant"] = MERCHANT
                    fixture["data"]["order"]["id"] = 900000 + n
                    fixture["data"]["order"]["customer"]["id"] = 300000 + n
                    body = json.dumps(fixture).encode()
                    started = time.monotonic()
                    await client.post(
                        f"{web_url}/webhooks/salla",
                        content=body,
                        headers=signed_headers(body, SECRET),
                    )
                    while not box.stores[MERCHANT].balances.get(300000 + n):
                        await asyncio.sleep(0.002)
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(rng_pause(n))
            await _stop_worker(worker, task)
    await redis.aclose()
    return {
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "target_ms": round((settings.batch_window_s + 0.1) * 1000, 1),
        "batch_window_ms": settings.batch_window_s * 1000,
    }


async def fairness(redis_url: str, backlog: int = 10_000, samples: int = 5) -> dict[str, Any]:
    """Store A has `backlog` grants waiting; how long does one grant of store B take?"""
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    box = Sandbox()
    other = MERCHANT + 1
    with serve_in_thread(create_sandbox_app(box)) as url:
        await _install(redis, box, rate_limit=100_000, rate_window_s=60)
        store_b = box.add_store(
            other, rate_limit=100_000, rate_window_s=60, plan_rate_limit=100_000
        )
        await tokens.save(
            redis,
            other,
            TokenSet(store_b.access_token, store_b.refresh_token, int(store_b.access_expires_at)),
        )
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(backlog):  # distinct points: every grant its own call
                grant = ledger.Grant(
                    id=f"{MERCHANT}-a{n}",
                    merchant=MERCHANT,
                    customer=500000 + n,
                    points=1 + n % 999,
                    type="plus",
                    reason=f"backlog {n}",
                    channels=(),
                    scope=f"order:{n}",
                    rule="bench",
                    due_ms=ledger.now_ms(),
                    created_ms=ledger.now_ms(),
                )
                pipe.hset(keys.grant(grant.id), mapping=grant.to_redis())
                pipe.zadd(keys.grant_set("pending", MERCHANT), {grant.id: grant.due_ms})
            pipe.sadd(keys.stores_pending(keys.index_shard(MERCHANT)), str(MERCHANT))
            await pipe.execute()
        settings = _settings(url, rate_limit_requests=100_000, rate_limit_window_s=60)
        worker, task = await _run_worker(settings, redis_url)
        from service import queue

        pool = await queue.connect(redis_url)
        await queue.enqueue_flush(pool, MERCHANT, 0)
        while len(box.stores[MERCHANT].calls) < 200:  # the backlog is draining
            await asyncio.sleep(0.01)
        latencies = []
        for n in range(samples):
            outcome = Outcome("b", "v", "grant", 7, "store B", (), "b", scope=f"order:b{n}")
            started = time.monotonic()
            await ledger.apply_outcomes(redis, other, [outcome], customer=600000 + n)
            await queue.enqueue_flush(pool, other, settings.batch_window_s)
            while not store_b.balances.get(600000 + n):
                await asyncio.sleep(0.002)
            latencies.append(time.monotonic() - started)
        remaining = await redis.zcard(keys.grant_set("pending", MERCHANT))
        await pool.aclose()
        await _stop_worker(worker, task)
    await redis.aclose()
    return {
        "backlog_of_other_store": backlog,
        "backlog_left_when_done": remaining,
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "target_ms": round((settings.batch_window_s + 1) * 1000, 1),
    }


def rng_pause(n: int) -> float:
    """Spread the samples over different points of the batch window."""
    return 0.05 + (n * 0.037) % 0.25


async def bench_delivery(redis_url: str) -> dict[str, Any]:
    results = {}
    results.update({f"batching_{k}": v for k, v in (await calls_vs_lower_bound(redis_url)).items()})
    results.update(
        {f"backlog_{k}": v for k, v in (await throughput_under_backlog(redis_url)).items()}
    )
    results.update({f"latency_{k}": v for k, v in (await webhook_to_credited(redis_url)).items()})
    results.update({f"fairness_{k}": v for k, v in (await fairness(redis_url)).items()})
    return results
