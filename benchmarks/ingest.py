"""Webhook ingest: the full path next to bare Starlette (wrk), latency at a fixed rate, and the
cost of each `WEBHOOK_DURABILITY` mode (`bench_ingest_durability`).

* Throughput: `wrk` (Debian's package; C, one epoll thread) posts distinct, correctly signed
  deliveries of Salla's sample order to one uvicorn process running the service (verify, parse,
  deduplicate, persist, 200), then the same requests to a bare Starlette endpoint that only
  reads the body, on the same uvicorn settings. The ratio is what the service's own work costs.
* Latency at a fixed rate: an open-loop client (below) sends one request every 1/rate seconds
  on warm keep-alive connections and measures each answer from the moment it was *due*, so a
  stall on the server shows as latency instead of slowing the client down (no coordinated
  omission). wrk 4 cannot hold a fixed rate (that is wrk2, which Debian does not package); the
  client is raw asyncio streams on uvloop with pre-built request bytes, in its own process with
  its garbage collector off, about 30 µs of Python per request: a few percent of one core.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from service.embedded import EmbeddedRedis
from service.keys import WEBHOOK_STREAM
from service.webhooks import sign
from tests.support.servers import free_port

ROOT = Path(__file__).parent.parent
SAMPLE = (ROOT / "tests" / "fixtures" / "order.status.updated.json").read_bytes()

# wrk's Lua: load pre-signed requests (signature TAB body per line) and send each once, in turn.
WRK_SCRIPT = """
local requests = {}
local n = 0
function init(args)
  for line in io.lines(args[1]) do
    local tab = line:find("\\t", 1, true)
    local headers = {
      ["Content-Type"] = "application/json",
      ["X-Salla-Security-Strategy"] = "Signature",
      ["X-Salla-Signature"] = line:sub(1, tab - 1),
    }
    requests[#requests + 1] = wrk.format("POST", "/webhooks/salla", headers, line:sub(tab + 1))
  end
end
function request()
  n = n % #requests + 1
  return requests[n]
end
"""


def signed_bodies(count: int, secret: str, start: int = 0) -> list[tuple[str, bytes]]:
    """Distinct deliveries (each a different order) of Salla's sample, signed with `secret`."""
    doc = json.loads(SAMPLE)
    out = []
    for n in range(start, start + count):
        doc["data"]["id"] = n
        doc["data"]["order"]["id"] = n
        body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        out.append((sign(body, secret), body))
    return out


def start_server(
    argv: list[str], env: dict[str, str], port: int, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60  # a process's start costs seconds on a busy machine
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/webhooks/salla", content=b"{}", timeout=1)
            return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"{argv} did not start on port {port}")


def stop_server(server: subprocess.Popen[bytes]) -> int:
    """Stop the server; return its peak resident memory in MiB (read before it exits)."""
    peak = peak_rss_mib(server.pid)
    server.terminate()
    server.wait(timeout=15)
    return peak


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return 0


def run_wrk(port: int, requests_file: Path, seconds: int, connections: int) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: `make bench` installs it (Debian package wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    result = subprocess.run(  # noqa: S603
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            script.name,
            f"http://127.0.0.1:{port}/webhooks/salla",
            "--",
            str(requests_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(script.name)
    out = result.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": round(rate),
        "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "p50": _wrk_percentile(out, "50%"),
        "p99": _wrk_percentile(out, "99%"),
    }


def _wrk_percentile(out: str, which: str) -> str:
    found = re.search(rf"^\s+{re.escape(which)}\s+(\S+)", out, re.MULTILINE)
    return found.group(1) if found else ""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status


def raw_request(port: int, signature: str, body: bytes) -> bytes:
    return (
        f"POST /webhooks/salla HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nX-Salla-Security-Strategy: Signature\r\n"
        f"X-Salla-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def fixed_rate(
    port: int, requests: list[bytes], rate: float, warm_connections: int = 8
) -> dict[str, Any]:
    """Send `requests` at `rate`/s (open loop); latency is measured from each one's due time."""
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    # First in, first out: every warm connection is used often, so none reaches the server's
    # keep-alive timeout; one that was closed anyway is reopened and the request resent.
    idle = collections.deque(
        [
            _Connection(*await asyncio.open_connection("127.0.0.1", port))
            for _ in range(warm_connections)
        ]
    )
    opened = len(idle)
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def one(request: bytes, due: float) -> None:
        nonlocal opened
        if idle:
            conn = idle.popleft()
        else:
            conn = _Connection(*await asyncio.open_connection("127.0.0.1", port))
            opened += 1
        try:
            status = await conn.exchange(request)
        except (asyncio.IncompleteReadError, ConnectionError):
            conn = _Connection(*await asyncio.open_connection("127.0.0.1", port))
            opened += 1
            status = await conn.exchange(request)
        latencies.append(clock() - due)
        statuses[status] = statuses.get(status, 0) + 1
        idle.append(conn)

    tasks = []
    start = clock() + 0.05
    for index, request in enumerate(requests):
        due = start + index / rate
        wait = due - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one(request, due)))
    await asyncio.gather(*tasks)
    achieved = len(requests) / (clock() - start)
    for conn in idle:
        conn.writer.close()
    latencies.sort()
    return {
        "rate_per_s": round(achieved),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "statuses": statuses,
        "connections": opened,
    }


def _fixed_rate_in_uvloop(port: int, requests: list[bytes], rate: float) -> dict[str, Any]:
    import uvloop

    # The client's own garbage collector must not pause it mid-measurement (this process holds
    # tens of thousands of request bodies): collect now, then keep it off for the run.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return uvloop.run(fixed_rate(port, requests, rate))
    finally:
        gc.enable()
        gc.unfreeze()


@contextlib.asynccontextmanager
async def aof_compaction_deferred(redis: Redis) -> AsyncIterator[None]:
    """Redis compacts its append-only file by forking a rewrite once the file has doubled past
    `auto-aof-rewrite-min-size` (64 MB): every 8 s run here writes 100-200 MB, so a rewrite (a
    second process copying the whole dataset) would land in each full-path run, on the same
    two cores as the server under test, and the bare run never pays it (measured in
    interleaved runs: 3-5% more server CPU per request with it). Deferred while the benchmark
    runs; every write still goes to the AOF, fsynced each second, exactly as in production."""
    key = "auto-aof-rewrite-min-size"
    before = (await redis.config_get(key))[key]
    await redis.config_set(key, "16gb")
    try:
        yield
    finally:
        await redis.config_set(key, before)


async def bench_ingest(
    redis_url: str,
    *,
    seconds: int = 8,
    connections: int = 32,
    wrk_rounds: int = 3,
    rate: float = 1000.0,
    rate_seconds: int = 5,
    rate_rounds: int = 3,
) -> dict[str, Any]:
    """p50/p99 at a fixed rate (three rounds), then full path vs bare Starlette (wrk, rounds
    taken in turn, medians reported); peak RSS."""
    secret = "bench-webhook-secret"  # noqa: S105 - a local benchmark secret
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "SALLA_WEBHOOK_SECRET": secret,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }
    async with aof_compaction_deferred(redis):
        port = 18100 + os.getpid() % 500
        with tempfile.TemporaryDirectory() as tmp:
            requests_file = Path(tmp) / "requests.tsv"
            # More distinct deliveries than the service can take in `seconds`: none is a duplicate.
            bodies = signed_bodies(60_000, secret)
            with requests_file.open("wb") as out:
                for signature, body in bodies:
                    out.write(signature.encode() + b"\t" + body + b"\n")

            # The fixed rate first, on a fresh service and an empty Redis: after the wrk runs,
            # Redis rewrites its AOF (a fork) and that would be measured instead of the service.
            service_cmd = [sys.executable, "-m", "service", "serve", "--port", str(port + 1)]
            server = start_server(service_cmd, env, port + 1)
            try:
                rounds = []
                count = int(rate * rate_seconds)
                steady_persisted = 0
                for n in range(rate_rounds):  # the VM is noisy: three rounds, the median reported
                    # Each round from an empty Redis: the accepted bodies (35 MB a round) would make
                    # Redis rewrite its AOF (a fork on these same two cores) during the next round.
                    steady_persisted += await redis.xlen(WEBHOOK_STREAM)
                    await redis.flushall()
                    await redis.bgrewriteaof()
                    await asyncio.sleep(1)
                    # The client runs in its own small process: this one holds 60,000 bodies.
                    client = [sys.executable, "-m", "benchmarks.ingest", str(port + 1), secret]
                    client += [str(count), str(rate), str(100_000 * (n + 1))]
                    done = await asyncio.to_thread(
                        subprocess.run, client, cwd=ROOT, capture_output=True, text=True, check=True
                    )
                    rounds.append(json.loads(done.stdout))
                steady_persisted += await redis.xlen(WEBHOOK_STREAM)

                # Throughput: the full path and bare Starlette in turn, `wrk_rounds` times each, the
                # medians reported. This VM's speed drifts by tens of percent within minutes; taken
                # in turn, both see the same phases, and one slow phase moves one round, not the
                # figure.
                bare = start_server([sys.executable, "-m", "benchmarks.bare", str(port)], env, port)
                try:
                    fulls, bares = [], []
                    for _ in range(wrk_rounds):
                        # From an empty Redis each time, as above (and every delivery is new again).
                        await redis.flushall()
                        await redis.bgrewriteaof()
                        await asyncio.sleep(1)
                        full = run_wrk(port + 1, requests_file, seconds, connections)
                        persisted = await redis.xlen(WEBHOOK_STREAM)
                        if full["non_2xx"] or persisted < min(full["requests"], len(bodies)):
                            raise RuntimeError(
                                f"a run did not persist every request: {full}, {persisted}"
                            )
                        fulls.append(full)
                        bares.append(run_wrk(port, requests_file, seconds, connections))
                finally:
                    stop_server(bare)
            finally:
                web_rss = stop_server(server)
    await redis.flushall()
    await redis.aclose()
    if steady_persisted != count * rate_rounds:
        raise RuntimeError(f"fixed-rate runs persisted {steady_persisted} of {count * rate_rounds}")
    p99s = sorted(r["p99_ms"] for r in rounds)
    full_rate = statistics.median(r["requests_per_s"] for r in fulls)
    bare_rate = statistics.median(r["requests_per_s"] for r in bares)
    # The ratio of each round's pair (taken seconds apart, so in the same phase of this VM),
    # then the median of those: the ratio of the two medians can pair a fast phase's bare run
    # with a slow phase's full run. Both are reported.
    ratios = [f["requests_per_s"] / b["requests_per_s"] for f, b in zip(fulls, bares, strict=True)]
    middle = sorted(fulls, key=lambda r: r["requests_per_s"])[len(fulls) // 2]
    return {
        "full_path_requests_per_s": round(full_rate),
        "bare_starlette_requests_per_s": round(bare_rate),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_of_medians": round(full_rate / bare_rate, 2),
        "rounds_full_bare_ratio": [
            f"{f['requests_per_s']} / {b['requests_per_s']} = {ratio:.2f}"
            for f, b, ratio in zip(fulls, bares, ratios, strict=True)
        ],
        "full_path_wrk_p50_p99": f"{middle['p50']} / {middle['p99']} at {connections} connections",
        "requests_each_round": [r["requests"] for r in fulls],
        f"p50_ms_at_{int(rate)}_per_s": statistics.median(r["p50_ms"] for r in rounds),
        f"p99_ms_at_{int(rate)}_per_s": statistics.median(p99s),
        "fixed_rate_p99_ms_each_round": p99s,
        "fixed_rate_achieved_per_s": min(r["rate_per_s"] for r in rounds),
        "fixed_rate_max_ms": max(r["max_ms"] for r in rounds),
        "web_peak_rss_mib": web_rss,
        "load_generator": (
            f"wrk -t1 -c{connections} -d{seconds}s, {wrk_rounds} rounds each in turn; "
            "fixed rate: open-loop client"
        ),
    }


#: The modes `bench_ingest_durability` compares, the first being the reference.
DURABILITY_MODES = ("buffered", "fsync", "replica")


@contextlib.contextmanager
def replica_of(redis_url: str, folder: Path) -> Iterator[EmbeddedRedis]:
    """A valkey-server replicating the one at `redis_url`, with its own AOF; yielded once the
    primary's `WAITAOF 1 1` is confirmed (after its first sync a replica rewrites its AOF and
    confirms nothing before that is done). `appendfsync always` on it: a replica fsyncs on its
    own clock, so with `everysec` a `replica` webhook would wait up to a second there, which
    measures that setting rather than the service (docs/operations.md says so to users)."""
    primary = urlsplit(redis_url)
    options = ("--replicaof", str(primary.hostname), str(primary.port), "--appendfsync", "always")
    with EmbeddedRedis(folder, free_port(), extra_args=options) as replica:
        client = SyncRedis.from_url(redis_url)
        try:
            deadline = time.monotonic() + 60
            while True:
                client.set("bench:probe", "1")
                if client.waitaof(1, 1, 200) == [1, 1]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's replica never confirmed a write")
            client.delete("bench:probe")
        finally:
            client.close()
        yield replica


async def bench_ingest_durability(
    redis_url: str, *, seconds: int = 8, connections: int = 32, rounds: int = 3
) -> dict[str, Any]:
    """The full webhook path under wrk in each `WEBHOOK_DURABILITY` mode, one web process per
    mode, the modes taken in turn `rounds` times (this VM's speed drifts; in turn, every mode
    sees the same phases), with a replica attached for the whole run; each mode's rate
    relative to `buffered` (the median of each round's ratio)."""
    secret = "bench-webhook-secret"  # noqa: S105 - a local benchmark secret
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    base_port = 18700 + os.getpid() % 500
    fulls: dict[str, list[dict[str, Any]]] = {mode: [] for mode in DURABILITY_MODES}
    async with aof_compaction_deferred(redis):
        with tempfile.TemporaryDirectory() as tmp, replica_of(redis_url, Path(tmp) / "replica"):
            requests_file = Path(tmp) / "requests.tsv"
            with requests_file.open("wb") as out:
                for signature, body in signed_bodies(60_000, secret):
                    out.write(signature.encode() + b"\t" + body + b"\n")
            servers = {}
            try:
                for n, mode in enumerate(DURABILITY_MODES):
                    env = {
                        **os.environ,
                        "REDIS_URL": redis_url,
                        "SALLA_WEBHOOK_SECRET": secret,
                        "LOG_LEVEL": "INFO",
                        "LOG_FORMAT": "json",
                        "WEBHOOK_DURABILITY": mode,
                    }
                    argv = [sys.executable, "-m", "service", "serve", "--port", str(base_port + n)]
                    servers[mode] = start_server(argv, env, base_port + n)
                for _ in range(rounds):
                    for n, mode in enumerate(DURABILITY_MODES):
                        await redis.flushall()  # every delivery new again; no AOF rewrite mid-run
                        await redis.bgrewriteaof()
                        await asyncio.sleep(1)
                        run = run_wrk(base_port + n, requests_file, seconds, connections)
                        persisted = await redis.xlen(WEBHOOK_STREAM)
                        if persisted < run["requests"] - run["non_2xx"]:
                            raise RuntimeError(f"{mode}: {persisted} persisted of {run}")
                        fulls[mode].append(run)
            finally:
                for server in servers.values():
                    stop_server(server)
    await redis.flushall()
    await redis.aclose()
    reference = fulls[DURABILITY_MODES[0]]
    result: dict[str, Any] = {}
    for mode in DURABILITY_MODES:
        result[f"{mode}_requests_per_s"] = round(
            statistics.median(r["requests_per_s"] for r in fulls[mode])
        )
    for mode in DURABILITY_MODES[1:]:
        ratios = [
            r["requests_per_s"] / b["requests_per_s"]
            for r, b in zip(fulls[mode], reference, strict=True)
        ]
        result[f"{mode}_vs_buffered"] = round(statistics.median(ratios), 2)
    result["rounds"] = [
        " / ".join(f"{mode} {fulls[mode][i]['requests_per_s']}" for mode in DURABILITY_MODES)
        for i in range(rounds)
    ]
    for mode in DURABILITY_MODES:
        middle = sorted(fulls[mode], key=lambda r: r["requests_per_s"])[len(fulls[mode]) // 2]
        result[f"{mode}_wrk_p50_p99"] = f"{middle['p50']} / {middle['p99']}"
    result["non_2xx"] = {mode: sum(r["non_2xx"] for r in fulls[mode]) for mode in fulls}
    result["method"] = (
        f"wrk -t1 -c{connections} -d{seconds}s per mode, {rounds} rounds taken in turn; one web "
        "process per mode on the embedded valkey-server (appendfsync everysec), a replica "
        "attached for every mode (appendfsync always), all on the same two cores"
    )
    return result


if __name__ == "__main__":  # the fixed-rate client: PORT SECRET COUNT RATE FIRST_ORDER_ID
    _port, _secret, _count, _rate, _start = sys.argv[1:6]
    _raw = [
        raw_request(int(_port), sig, body)
        for sig, body in signed_bodies(int(_count), _secret, start=int(_start))
    ]
    print(json.dumps(_fixed_rate_in_uvloop(int(_port), _raw, float(_rate))))
