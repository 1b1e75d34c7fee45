"""Interleaved A/B of the webhook ingest: another revision's `serve` (A) against this checkout's
(B), with bare Starlette (this checkout's `benchmarks.bare`) for the ratio `make bench` reports.

    .venv/bin/python -m benchmarks.ab REV [ROUNDS]

Each round runs wrk against A, B and bare in turn (the order rotates from round to round), each
from an empty Redis, so all three see the same phases of a noisy machine; per-round ratios and
their medians are printed as JSON. A is `git archive REV`, run with this checkout's virtualenv.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from benchmarks.ingest import aof_compaction_deferred, run_wrk, signed_bodies, start_server
from service.embedded import EmbeddedRedis

ROOT = Path(__file__).parent.parent


def checkout(rev: str, into: Path) -> Path:
    git = ["git", "archive", rev]  # git from PATH, as a developer runs it
    archive = subprocess.run(git, cwd=ROOT, capture_output=True, check=True).stdout  # noqa: S603
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def persisted_count(redis: Redis) -> int:
    """Entries in every stream: A may be a revision that named the inbox stream otherwise."""
    streams = [key async for key in redis.scan_iter(_type="stream")]
    return sum([await redis.xlen(key) for key in streams])


async def ab(rev: str, rounds: int, seconds: int = 8, connections: int = 32) -> dict[str, Any]:
    secret = "bench-webhook-secret"  # noqa: S105 - a local benchmark secret
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis", 16398) as db:
        other = checkout(rev, Path(tmp) / "other")
        env = {**os.environ, "REDIS_URL": db.url, "SALLA_WEBHOOK_SECRET": secret,
               "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}  # fmt: skip
        requests_file = Path(tmp) / "requests.tsv"
        bodies = signed_bodies(60_000, secret)
        with requests_file.open("wb") as out:
            for signature, body in bodies:
                out.write(signature.encode() + b"\t" + body + b"\n")
        serve = [sys.executable, "-m", "service", "serve", "--port"]
        ports = {"A": 18601, "B": 18602, "bare": 18603}
        servers = {
            "A": start_server([*serve, "18601"], env, ports["A"], cwd=other),
            "B": start_server([*serve, "18602"], env, ports["B"]),
            "bare": start_server([sys.executable, "-m", "benchmarks.bare", "18603"], env, 18603),
        }
        redis = Redis.from_url(db.url)
        rates: dict[str, list[int]] = {name: [] for name in ports}
        cpu_us: dict[str, list[float]] = {name: [] for name in ports}
        try:
            async with aof_compaction_deferred(redis):
                order = ["A", "B", "bare"]
                for n in range(rounds):
                    for name in order[n % 3 :] + order[: n % 3]:
                        await redis.flushall()
                        await redis.bgrewriteaof()
                        await asyncio.sleep(1)
                        cpu_before = cpu_seconds(servers[name].pid)
                        result = run_wrk(ports[name], requests_file, seconds, connections)
                        cpu = cpu_seconds(servers[name].pid) - cpu_before
                        cpu_us[name].append(round(cpu / max(result["requests"], 1) * 1e6, 1))
                        if name != "bare":
                            persisted = await persisted_count(redis)
                            if result["non_2xx"] or persisted < min(result["requests"], 60_000):
                                raise RuntimeError(f"{name}: not all persisted: {result}")
                        rates[name].append(result["requests_per_s"])
        finally:
            await redis.aclose()
            for server in servers.values():
                server.terminate()
                server.wait(timeout=15)
    per_round = {
        f"{a}/{b}": [round(x / y, 3) for x, y in zip(rates[a], rates[b], strict=True)]
        for a, b in (("A", "bare"), ("B", "bare"), ("B", "A"))
    }
    # The server's CPU time per request moves much less with the machine's other work than
    # requests/s does: A's CPU per request over B's is B's speed relative to A's, by CPU.
    by_cpu = [round(a / b, 3) for a, b in zip(cpu_us["A"], cpu_us["B"], strict=True)]
    return {
        "A": rev,
        "B": "this checkout",
        "requests_per_s": rates,
        "ratio_per_round": per_round,
        "ratio_median": {key: statistics.median(values) for key, values in per_round.items()},
        "server_cpu_us_per_request": cpu_us,
        "B/A_by_cpu_per_round": by_cpu,
        "B/A_by_cpu_median": statistics.median(by_cpu),
        "load_generator": f"wrk -t1 -c{connections} -d{seconds}s, {rounds} rounds, order rotated",
    }


if __name__ == "__main__":
    revision = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(json.dumps(asyncio.run(ab(revision, count)), indent=2))
