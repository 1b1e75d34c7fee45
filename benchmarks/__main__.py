"""`make bench`: figures for this machine, printed as a table and saved as
benchmarks/results.json (committed: the one source of the figures README.md and docs/ quote;
the run rewrites those quotes, benchmarks/quotes.py, and tests/test_docs.py checks them) and
var/bench/latest.json.

`BENCH_NOTE="..."` records the conditions of the run (another load on the machine, say) in the
file's `run` section, next to the date and the commit measured.

Timing lives here, never in pass/fail tests. Current figures:

* rules: events evaluated per second against the example rules/ (one core, pure Python);
* ledger: order events applied per second to a real redis-server (one connection, sequential);
* ingest (benchmarks/ingest.py): the full webhook path next to bare Starlette under wrk, the
  ratio, p50/p99 at a fixed 1,000 requests/s, and the web process's peak RSS;
* ingest_durability (benchmarks/ingest.py): the full path under wrk in each
  `WEBHOOK_DURABILITY` mode (buffered, fsync, replica), each relative to buffered;
* worker (benchmarks/worker.py): events/s of one worker process from persisted webhook to
  queued grant, its CPU per event and peak RSS, and Redis bytes per webhook kept for replay;
* delivery (benchmarks/delivery.py): calls against the lower bound, throughput under a backlog,
  webhook-to-credited latency, fairness between stores;
* orders (benchmarks/orders.py): orders taken to Salla's orders API per 1,000 orders (clean and
  tangled traffic), reconciliation's list and details calls against their targets;
* sweep (benchmarks/sweep.py): Redis commands and seconds of one sweep cycle at 5,000 listed
  stores, with `SWEEP_STORES_PER_CYCLE` at its default and unbounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from benchmarks.delivery import bench_delivery
from benchmarks.ingest import bench_ingest, bench_ingest_durability
from benchmarks.orders import bench_orders
from benchmarks.quotes import refresh_docs
from benchmarks.sweep import bench_sweep
from benchmarks.worker import bench_worker
from service import keys, ledger
from service.embedded import EmbeddedRedis
from service.events import normalise
from service.rules import evaluate, load_rules, prepare
from service.webhooks import parse_envelope
from tests.support.servers import free_port

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
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
    baseline = int((await redis.info("memory"))["used_memory"])
    started = time.perf_counter()
    for n in range(events):
        outcomes = [replace(o, scope=f"order:{n}") for o in evaluate(ruleset, ctx)]
        await ledger.apply_outcomes(redis, 1, outcomes, customer=ctx.customer.id, order_id=n)
    elapsed = time.perf_counter() - started
    info = await redis.info("memory")
    pending = await redis.zcard(keys.grant_set("pending", 1))
    await redis.aclose()
    if pending != events:  # a benchmark that wrote nothing must not report a figure
        raise RuntimeError(f"ledger benchmark created {pending} grants, expected {events}")
    return {
        "events_per_s": round(events / elapsed),
        # The grant, its queue entry, the order's ledger entry and the admin indexes.
        "redis_bytes_per_pending_grant": round((int(info["used_memory"]) - baseline) / pending),
    }


def _commit() -> str:
    """The commit measured, `+changes` when the work tree differs from it."""
    git = shutil.which("git")
    if git is None:
        return "unknown"

    def out(*args: str) -> str:
        command = [git, *args]  # fixed arguments, git from PATH
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: S603

    head = out("rev-parse", "--short", "HEAD")
    dirty = out("status", "--porcelain", "--untracked-files=no")
    return f"{head}+changes" if dirty else head or "unknown"


async def main() -> None:
    results: dict[str, Any] = {
        "run": {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "commit": _commit(),
            "note": os.environ.get("BENCH_NOTE", ""),
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    results["rules"] = bench_rules()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), free_port()) as redis:
        results["ledger"] = await bench_ledger(redis.url)
        results["ingest"] = await bench_ingest(redis.url)
        results["ingest_durability"] = await bench_ingest_durability(redis.url)
        results["worker"] = await bench_worker(redis.url)
        results["delivery"] = await bench_delivery(redis.url)
        results["orders"] = await bench_orders(redis.url)
        results["sweep"] = await bench_sweep(redis.url)
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    (out / "latest.json").write_text(text)
    RESULTS.write_text(text)
    quoted = refresh_docs(ROOT, results)
    print(f"{'benchmark':<10} {'figure':<40} value")
    for section, figures in results.items():
        if section in ("run", "machine"):
            continue
        for name, value in figures.items():
            print(f"{section:<10} {name:<40} {value}")
    print(f"\nsaved: {RESULTS.relative_to(ROOT)} (commit it; README.md and docs/ quote it)")
    for path in quoted:
        print(f"figures quoted in {path.relative_to(ROOT)} rewritten from it")


if __name__ == "__main__":
    asyncio.run(main())
