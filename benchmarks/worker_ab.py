"""Interleaved A/B of the worker benchmark: another checkout (A) against this one (B).

    git worktree add /tmp/parent <rev> && python -m benchmarks.worker_ab /tmp/parent [ROUNDS]

Each round runs `benchmarks.worker.bench_worker` from A's folder, then from B's (each imports
its own `service` package: the working folder comes first on the path), on one redis-server;
it prints events/s and the worker's CPU ms per event of each, both ratios, and their medians.
The VM is noisy (single pairs of events/s ranged 0.73-0.98 on one quiet afternoon, 0.6-2.1
beside other work): compare medians of many rounds, and on a busy machine the CPU ratio.
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


def measure(root: Path, redis_url: str) -> tuple[float, float] | None:
    """(events/s, worker CPU ms per event) of one run of `root`'s worker benchmark."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(  # noqa: S603 - this interpreter, a fixed snippet
        [sys.executable, "-c", SNIPPET, redis_url], cwd=root, capture_output=True, text=True,
        env=env, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:  # say why, rather than a bare "None"
        print(f"{root}: no result: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    result = json.loads(lines[-1])
    return float(result["events_per_s"]), float(result["worker_cpu_ms_per_event"])


def main() -> None:
    other = Path(sys.argv[1]).resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rates, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), free_port()) as redis:
        for n in range(rounds):
            # A B, then B A: whatever the first run of a pair pays (a warm page cache, an AOF
            # rewrite) falls on each side equally often.
            if n % 2 == 0:
                a, b = measure(other, redis.url), measure(HERE, redis.url)
            else:
                b, a = measure(HERE, redis.url), measure(other, redis.url)
            if a is None or b is None:
                print(f"round {n}: n/a", flush=True)
                continue
            # Events/s moves with whatever else the machine runs; the worker's CPU time per
            # event much less so: A's CPU per event over B's is B's speed on a quiet machine.
            rates.append(b[0] / a[0])
            cpus.append(a[1] / b[1])
            print(
                f"round {n}: A {a[0]:.0f} events/s {a[1]} CPU ms/event, "
                f"B {b[0]:.0f} events/s {b[1]} CPU ms/event; "
                f"B/A events/s {rates[-1]:.2f}, by CPU {cpus[-1]:.2f}",
                flush=True,
            )
    if rates:
        print(
            f"median B/A over {len(rates)} rounds: events/s {statistics.median(rates):.2f}, "
            f"by CPU per event {statistics.median(cpus):.2f}"
        )


if __name__ == "__main__":
    main()
