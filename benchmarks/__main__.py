"""`make bench`: figures for this machine, printed as a table and saved under var/bench/.

Timing lives here, never in pass/fail tests. Current figures:

* rules: events evaluated per second against the example rules/ (one core, pure Python);
* ledger: order events applied per second to a real redis-server (one connection, sequential);
* ingest: webhooks per second through POST /webhooks/salla (verify, parse, dedupe, persist),
  one uvicorn process, driven by concurrent httpx clients from this process.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from benchmarks.delivery import bench_delivery
from service import ledger
from service.embedded import EmbeddedRedis
from service.events import normalise
from service.rules import evaluate, load_rules, prepare
from service.webhooks import parse_envelope, signed_headers

ROOT = Path(__file__).parent.parent
SAMPLE = (ROOT / "tests" / "fixtures" / "order.status.updated.json").read_bytes()
SECRET = "bench-webhook-secret"  # noqa: S105 - a local benchmark secret


def bench_rules(rounds: int = 5, seconds: float = 1.0) -> dict[str, Any]:
    """Events evaluated per second (normalise + prepare + evaluate), best of `rounds`.

    Two figures: the heaviest sample alone (a completed order, which four rules read) and a
    mix of Salla's published samples (orders, a review, a signup).
    """
    ruleset = load_rules(ROOT / "rules")
    fixtures = ROOT / "tests" / "fixtures"
    heavy = [parse_envelope(SAMPLE)]
    mix = [
        parse_envelope((fixtures / name).read_bytes())
        for name in (
            "order.status.updated.json",
            "order.created.json",
            "review.added.json",
            "customer.created.derived.json",
            "order.cancelled.derived.json",
        )
    ]

    def rates(envelopes: list[Any]) -> tuple[int, int]:
        measured = []
        for _ in range(rounds):
            count = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                for env in envelopes:
                    ctx, _ = prepare(ruleset, normalise(env))
                    evaluate(ruleset, ctx)
                count += len(envelopes)
            measured.append(count / (time.perf_counter() - started))
        return round(max(measured)), round(statistics.median(measured))

    heavy_best, heavy_median = rates(heavy)
    mix_best, mix_median = rates(mix)
    return {
        "completed_order_events_per_s_best": heavy_best,
        "completed_order_events_per_s_median": heavy_median,
        "sample_mix_events_per_s_best": mix_best,
        "sample_mix_events_per_s_median": mix_median,
        "rules": len(ruleset.rules),
        "method": f"{rounds} rounds x {seconds:g}s, one core (the VM is noisy: best and median)",
    }


async def bench_ledger(redis_url: str, events: int = 3000) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    ruleset = load_rules(ROOT / "rules")
    ctx, _ = prepare(ruleset, normalise(parse_envelope(SAMPLE)))
    started = time.perf_counter()
    for n in range(events):
        outcomes = [replace(o, scope=f"order:{n}") for o in evaluate(ruleset, ctx)]
        await ledger.apply_outcomes(redis, 1, outcomes, customer=ctx.customer.id, order_id=n)
    elapsed = time.perf_counter() - started
    info = await redis.info("memory")
    pending = await redis.zcard("sr:pending:1")
    await redis.aclose()
    if pending != events:  # a benchmark that wrote nothing must not report a figure
        raise RuntimeError(f"ledger benchmark created {pending} grants, expected {events}")
    return {
        "events_per_s": round(events / elapsed),
        "redis_bytes_per_pending_grant": round(int(info["used_memory"]) / max(pending, 1)),
    }


async def bench_ingest(
    redis_url: str, requests: int = 4000, concurrency: int = 32
) -> dict[str, Any]:
    port = 18000 + os.getpid() % 1000
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SALLA_WEBHOOK_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
    }
    # The server must be its own process; starting it synchronously here is fine.
    server = subprocess.Popen(  # noqa: S603, ASYNC220
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/webhooks/salla"
    try:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
            for _ in range(100):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
            bodies = []
            for n in range(requests):
                doc = json.loads(SAMPLE)
                doc["data"]["id"] = n  # distinct deliveries, so nothing is deduplicated
                body = json.dumps(doc).encode()
                bodies.append((body, signed_headers(body, SECRET)))
            latencies: list[float] = []
            queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
            for item in bodies:
                queue.put_nowait(item)

            async def client_loop() -> None:
                while not queue.empty():
                    body, headers = queue.get_nowait()
                    t0 = time.perf_counter()
                    response = await client.post(url, content=body, headers=headers)
                    latencies.append(time.perf_counter() - t0)
                    assert response.status_code == 200, response.text

            started = time.perf_counter()
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=10)
    latencies.sort()
    return {
        "requests_per_s": round(requests / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "concurrency": concurrency,
        # Known limit: this client is slower than the server on a 2-core machine, so these
        # figures understate the service; a wrk-based figure replaces it (issue 6).
        "load_generator": "httpx.AsyncClient, same machine (client-bound: understates server)",
    }


async def main() -> None:
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    results["rules"] = bench_rules()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), 16399) as redis:
        results["ledger"] = await bench_ledger(redis.url)
        results["ingest"] = await bench_ingest(redis.url)
        results["delivery"] = await bench_delivery(redis.url)
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    print(f"{'benchmark':<10} {'figure':<40} value")
    for section, figures in results.items():
        if section == "machine":
            continue
        for name, value in figures.items():
            print(f"{section:<10} {name:<40} {value}")
    print(f"\nsaved: {out / 'latest.json'}")


if __name__ == "__main__":
    asyncio.run(main())
