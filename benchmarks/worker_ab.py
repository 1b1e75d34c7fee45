"""Interleaved A/B of the worker benchmark: another checkout (A) against this one (B).

    git worktree add /tmp/parent <rev> && python -m benchmarks.worker_ab /tmp/parent [ROUNDS]

Each round runs `benchmarks.worker.bench_worker` from A's folder, then from B's (each imports
its own `service` package: the working folder comes first on the path), on one redis-server;
it prints events/s of each, their ratio, and the median ratio. The VM is noisy (single pairs
ranged 0.73-0.98 on one quiet afternoon): compare the median of many rounds, not one pair.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from service.embedded import EmbeddedRedis
from tests.support.servers import free_port

HERE = Path(__file__).parent.parent
SNIPPET = """
import asyncio, json, sys
from benchmarks.worker import bench_worker
from service.logging import configure_logging
configure_logging("json", "WARNING")
print(json.dumps(asyncio.run(bench_worker(sys.argv[1]))))
"""


def events_per_s(root: Path, redis_url: str) -> float | None:
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed snippet
        [sys.executable, "-c", SNIPPET, redis_url], cwd=root, capture_output=True, text=True,
        env=env, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:  # say why, rather than a bare "None"
        print(f"{root}: no result: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(json.loads(lines[-1])["events_per_s"])


def main() -> None:
    other = Path(sys.argv[1]).resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    ratios = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), free_port()) as redis:
        for n in range(rounds):
            # A B, then B A: whatever the first run of a pair pays (a warm page cache, an AOF
            # rewrite) falls on each side equally often.
            if n % 2 == 0:
                a, b = events_per_s(other, redis.url), events_per_s(HERE, redis.url)
            else:
                b, a = events_per_s(HERE, redis.url), events_per_s(other, redis.url)
            ratio = f"{b / a:.2f}" if a and b else "n/a"
            if a and b:
                ratios.append(b / a)
            print(f"round {n}: A {a} events/s, B {b} events/s, B/A {ratio}", flush=True)
    if ratios:
        print(f"median B/A over {len(ratios)} rounds: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
