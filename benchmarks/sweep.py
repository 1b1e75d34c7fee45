"""The sweep's cost per cycle at many listed stores (service/sweeper.py): Redis commands (INFO
commandstats, the queue's included: one server here) and seconds for one cycle, with the
budget `SWEEP_STORES_PER_CYCLE` at its default and with no bound (every store every cycle, as
before the budget), and the cycles a whole rotation takes.

Every store is listed with one due grant whose flush job is missing (the worst case: each visit
queues a flush). Run alone: `python -m benchmarks.sweep [--stores 50000]` (20,000 by default);
`make bench` runs it at 5,000 stores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from service import keys, ledger, queue, sweeper
from service.delivery.deps import Deps
from service.embedded import EmbeddedRedis
from service.rules.engine import Outcome
from service.salla import SallaClient
from service.settings import Settings
from tests.support.servers import free_port

FIRST_MERCHANT = 1_400_000_000
ROOT = Path(__file__).parent.parent


async def _calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


async def _list_stores(redis: Redis, stores: int) -> None:
    grant = Outcome("purchase", "v1", "grant", 10, "order R1", ("sms",), "bench", scope="order:1")
    merchants = [FIRST_MERCHANT + n for n in range(stores)]
    for start in range(0, stores, 64):
        await asyncio.gather(
            *(
                ledger.apply_outcomes(redis, m, [grant], customer=42)
                for m in merchants[start : start + 64]
            )
        )


async def _cycle(deps: Deps) -> tuple[int, int, float]:
    """One cycle's stores visited, commands sent and seconds."""
    before = await _calls(deps.redis)
    started = time.perf_counter()
    report = await sweeper.visit_stores(deps)
    elapsed = time.perf_counter() - started
    return report.stores, await _calls(deps.redis) - before - 1, elapsed  # -1: INFO itself


async def bench_sweep(redis_url: str, stores: int = 5_000) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    pool = await queue.connect(redis_url)
    default = Settings.model_fields["sweep_stores_per_cycle"].default
    results: dict[str, Any] = {"stores_listed": stores, "budget_default": default}
    try:
        await _list_stores(redis, stores)
        async with httpx.AsyncClient() as http:
            for name, budget in (("budgeted", default), ("unbounded", stores)):
                await redis.delete("arq:queue", keys.SWEEP_CURSOR)  # each from shard 0
                settings = Settings(app_env="development", sweep_stores_per_cycle=budget)
                deps = Deps(settings, redis, pool, SallaClient(http, settings.salla_api_base))
                visited, commands, seconds = await _cycle(deps)
                if not visited:  # a benchmark that visited nothing must not report a figure
                    raise RuntimeError(f"the sweep visited no store of {stores}")
                results[f"{name}_stores_per_cycle"] = visited
                results[f"{name}_commands_per_cycle"] = commands
                results[f"{name}_commands_per_store"] = round(commands / visited, 1)
                results[f"{name}_seconds_per_cycle"] = round(seconds, 2)
                results[f"{name}_cycles_per_rotation"] = math.ceil(stores / budget)
    finally:
        await pool.aclose()
        await redis.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__)
    parser.add_argument("--stores", type=int, default=20_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), free_port()) as server:
        result = asyncio.run(bench_sweep(server.url, args.stores))
    for name, value in result.items():
        print(f"{name:36} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
