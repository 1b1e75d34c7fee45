"""Bounded memory: settled orders compacted, and retired to tombstones after
`LEDGER_RETENTION_DAYS`.

An order's entry starts full (`sr:{m:M}:led:order:<id>`, a hash of JSON) and is queued in its
store's `to-compact` set when it is first written. The worker's sweep visits a few stores whose
compaction is due each cycle (`sr:{x:n}:stores:compact`, by when each is next due, one per
index shard), so 50,000 stores
spread over the day instead of weighing on one cycle. An order is compacted when its newest
event is older than its longest return window (`hold_days`) plus `COMPACT_AFTER_S`, and every
grant its rules made is sent or netted (or its record expired); its entry and `led-index` set
then become one short string (`sr:{m:M}:lc:<id>`, service/ledger/packed.py). The compaction
commits like any event (`commit`: only if the entry's version and each grant's state are
still what was read), so an event for the same order either comes first (the compaction reads
again later) or reads the compacted entry.

A later event reads the compacted entry as the full one it stands for, and its commit writes the
entry in full again (checked against the compacted value, so nothing interleaves); the order is
queued to be compacted again. Compaction is exact: a late cancel takes the points back, a re-sent
webhook finds what it would have found.

`LEDGER_RETENTION_DAYS` after it was compacted, an order still compacted is retired: its entry
goes and its id joins one of the store's tombstone sets (an intset: 4 or 8 bytes an order). An
event for a retired order is refused (`order_retired` is logged by the caller): without its
entry, a re-sent completion would pay again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from service import autopipe, keys, lua, process_state
from service.ledger import packed
from service.ledger.commit import Writes, commit
from service.ledger.facts import OrderFacts
from service.ledger.order_state import RuleRecord
from service.ledger.shards import due_in_shards
from service.logging import get_logger

log = get_logger("service.ledger")

#: A settled order stays full this long after its newest event and return window: Salla's
#: re-sends end within minutes and most changes to an order come in its first days; compaction
#: is exact, so this only saves rewriting an entry that is still busy.
COMPACT_AFTER_S = 14 * 86400
#: An order with a grant still on its way (or unknown, failed) is looked at again this much later.
BUSY_RETRY_MS = 86400 * 1000
WEEK_MS = 7 * 86400 * 1000
DAY_MS = 86400 * 1000
#: How long a process trusts that a store it listed in `stores:compact` is still there.
LISTED_FRESH_S = 3600
#: Weeks of compacted orders one visit of a store retires at most.
RETIRE_WEEKS_PER_VISIT = 8
_SETTLED = frozenset({"sent", "netted"})

# KEYS: the compacted entry, the full entry, the tombstone set. Retires the order only if it is
# still compacted (a later event writes it in full again and queues it to be compacted anew).
_RETIRE = lua.Script("""#!lua
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('SADD', KEYS[3], ARGV[1])
  return 1
end
return 0
""")


@dataclass(frozen=True, slots=True)
class Stored:
    """An order's entry as stored: its full fields (a compacted entry's read back), the
    compacted field's value ("" for a full entry), the scopes the order granted elsewhere that
    the compacted entry holds, and whether the order was retired."""

    raw: Mapping[str, str]
    compact: str = ""
    linked: tuple[str, ...] = ()
    retired: bool = False


async def read_stored(redis: Redis, merchant: int, order_id: int) -> Stored:
    """The order's entry, whichever its form. A missing full entry costs one more round trip
    (compacted? retired?): once per order for a new one, whose first event writes it."""
    pipe = autopipe.auto(redis)
    raw: dict[str, str] = await pipe.execute("HGETALL", keys.entry(merchant, f"order:{order_id}"))
    if raw:
        return Stored(raw)
    compacted = pipe.execute("GET", keys.compacted(merchant, order_id))
    retired = pipe.execute("SISMEMBER", keys.tombstones(merchant, order_id), order_id)
    value, gone = await compacted, await retired
    if value is None:
        return Stored({}, retired=bool(gone))
    ids = packed.text_ids(value)
    found = await pipe.execute("HMGET", keys.texts(merchant), *ids) if ids else []
    unpacked = packed.unpack(value, order_id, dict(zip(ids, found, strict=True)))
    return Stored(unpacked.fields, value, unpacked.linked)


def queue(writes: Writes, merchant: int, order_id: int, now_ms: int) -> int:
    """Queue the order to be looked at for compaction (inside the commit that writes its entry
    in full); returns when, for `store_due`."""
    due = now_ms + COMPACT_AFTER_S * 1000
    writes.zadd(keys.compact_queue(merchant), {str(order_id): due})
    return due


def store_due(redis: Redis, merchant: int, due_ms: int) -> asyncio.Future[Any] | None:
    """Make sure the store is in `stores:compact` (a cross-store key: queued beside the commit,
    before it, like the pending-stores set). The sweep never drops a store from it and
    re-schedules each store it visits by its own queue, so this only needs the store listed:
    `NX`, and once an hour per process (None when nothing was queued)."""
    now = time.time()
    last = process_state.compaction_listed.get(merchant)
    if last is not None and now - last < LISTED_FRESH_S:
        return None
    process_state.compaction_listed[merchant] = now
    listing = keys.stores_compact(keys.index_shard(merchant))
    return autopipe.auto(redis).execute("ZADD", listing, "NX", due_ms, str(merchant))


# duplicates: a tally dataclass like admin/replay.py's ReplayTally (the shape only).
@dataclass
class Pass:
    """What one compaction pass did."""

    stores: int = 0
    compacted: int = 0
    retired: int = 0
    kept_full: int = 0


async def compact_due_stores(
    redis: Redis, now_ms: int, retention_days: int, *, stores: int = 10, per_store: int = 100
) -> Pass:
    """The sweep's share: up to `stores` stores whose compaction is due, `per_store` orders
    each (a store with more is visited again next cycle). The most overdue first, across the
    index shards: each shard's `stores` most overdue, merged."""
    done = Pass()
    due = await due_in_shards(redis, keys.stores_compact, now_ms, per_shard=stores)
    for merchant, _ in due[:stores]:
        one = await compact_store(redis, merchant, now_ms, retention_days, limit=per_store)
        done.stores += 1
        done.compacted += one.compacted
        done.retired += one.retired
        done.kept_full += one.kept_full
    return done


async def compact_store(
    redis: Redis, merchant: int, now_ms: int, retention_days: int, *, limit: int = 200
) -> Pass:
    """Compact the store's due orders (at most `limit`), retire what is past retention, and say
    when the store is next due."""
    done = Pass(stores=1)
    queue_key = keys.compact_queue(merchant)
    due: list[str] = await redis.zrangebyscore(queue_key, "-inf", now_ms, start=0, num=limit)
    for member in due:
        result = await compact_order(redis, merchant, int(member), now_ms)
        if result == "compacted":
            done.compacted += 1
        elif result == "kept_full":
            done.kept_full += 1
        elif isinstance(result, int):
            await redis.zadd(queue_key, {member: result}, xx=True)
    done.retired = await retire_due(redis, merchant, now_ms, retention_days)
    first = await redis.zrange(queue_key, 0, 0, withscores=True)
    upcoming = int(first[0][1]) if first else now_ms + DAY_MS
    # Visited at least daily (retirement), and again next cycle while orders are left due.
    nxt = now_ms if len(due) >= limit else min(max(upcoming, now_ms), now_ms + DAY_MS)
    await redis.zadd(keys.stores_compact(keys.index_shard(merchant)), {str(merchant): nxt})
    return done


async def compact_order(redis: Redis, merchant: int, order_id: int, now_ms: int) -> str | int:
    """Compact one order if it is settled: "compacted"; "kept_full" when its entry cannot be
    packed (it stays full, which is correct); "gone" when there is nothing to compact; else when
    to look again (epoch ms)."""
    entry_key = keys.entry(merchant, f"order:{order_id}")
    queue_key = keys.compact_queue(merchant)
    raw: dict[str, str] = await redis.hgetall(entry_key)  # type: ignore[misc]
    if not raw:  # compacted already, or never written
        await redis.zrem(queue_key, str(order_id))
        return "gone"
    facts = OrderFacts.from_fields(raw)
    records = [RuleRecord.decode(v) for n, v in raw.items() if n[:2] == "r:"]
    hold_s = max((v.hold_s for r in records for v in r.verdicts.values()), default=0)
    eligible = _newest_ms(facts) + (hold_s + COMPACT_AFTER_S) * 1000
    if eligible > now_ms:
        return eligible
    grant_ids = [g for r in records for g in r.open]
    pipe = autopipe.auto(redis)
    queued = [pipe.execute("HGET", keys.grant(g), "state") for g in grant_ids]
    states = {g: await q for g, q in zip(grant_ids, queued, strict=True)}
    if any(state is not None and state not in _SETTLED for state in states.values()):
        return now_ms + BUSY_RETRY_MS
    linked: set[str] = await redis.smembers(keys.order_index(merchant, order_id))  # type: ignore[misc]
    try:
        value = packed.pack(raw, order_id, sorted(linked))
        ids = sorted(value.texts)
        have = await redis.hmget(keys.texts(merchant), ids)  # type: ignore[misc]
        for text_id, text in zip(ids, have, strict=True):
            if text is not None and text != value.texts[text_id]:
                raise packed.NotPackable(f"text id {text_id} is taken by another text")
    except packed.NotPackable as exc:
        log.info("order_kept_full", merchant=merchant, order_id=order_id, why=str(exc))
        await redis.zrem(queue_key, str(order_id))
        return "kept_full"
    week = now_ms // WEEK_MS
    writes = Writes()
    writes.check(entry_key, "v", raw.get("v"))
    for grant_id, state in states.items():
        writes.check(keys.grant(grant_id), "state", state)
    writes.delete(entry_key)
    writes.set(keys.compacted(merchant, order_id), value.value)
    for text_id, text in value.texts.items():
        writes.hsetnx(keys.texts(merchant), text_id, text)
    writes.delete(keys.order_index(merchant, order_id))
    writes.sadd(keys.compacted_week(merchant, week), str(order_id))
    writes.setnx(keys.retired_upto(merchant), str(week - 1))
    writes.zrem(queue_key, str(order_id))
    if not await commit(redis, writes):
        return now_ms  # an event came first: looked at again next visit
    return "compacted"


async def retire_due(redis: Redis, merchant: int, now_ms: int, retention_days: int) -> int:
    """Retire the orders compacted in weeks that ended `retention_days` ago or more."""
    upto = await redis.get(keys.retired_upto(merchant))
    if upto is None:
        return 0
    last = (now_ms - retention_days * DAY_MS) // WEEK_MS - 1
    retired = 0
    for week in range(int(upto) + 1, min(last, int(upto) + RETIRE_WEEKS_PER_VISIT) + 1):
        bucket = keys.compacted_week(merchant, week)
        for member in await redis.smembers(bucket):  # type: ignore[misc]
            order_id = int(member)
            retired += int(
                await _RETIRE.run(
                    redis,
                    [
                        keys.compacted(merchant, order_id),
                        keys.entry(merchant, f"order:{order_id}"),
                        keys.tombstones(merchant, order_id),
                    ],
                    str(order_id),
                )
            )
        await redis.delete(bucket)
        await redis.set(keys.retired_upto(merchant), str(week))
    return retired


def _newest_ms(facts: OrderFacts) -> int:
    newest = facts.newest
    if newest is None:
        return 0
    return newest.at_s * 1000 if newest.at_s is not None else newest.arrival[0]
