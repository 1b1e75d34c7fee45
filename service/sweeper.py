"""The sweep: the worker's cron every 5 s (one worker at a time) that re-creates what a dead
worker or a lost queue left behind, sets the gauges, and does the housekeeping.

Store by store, for the stores the index shards list in `stores:pending` or `stores:unknown`:
claims that outlived their worker go back (`ledger.sweep_claims`), held grants whose
confirmation is overdue are asked about again, a store with due grants gets its flush queued
(again: a queue failover may have lost it), one with unknown outcomes old enough its
reconciliation, and a store idle twice is forgotten.

That is a few round trips a store, so a cycle does not visit every store: it visits at most
`SWEEP_STORES_PER_CYCLE` of them, in rotation. The stores are taken shard by shard, in id order
within a shard, from where the last cycle stopped; the place is kept in Redis
(`keys.SWEEP_CURSOR`: the cron runs on whichever worker takes it). With fewer listed stores than
the budget, every cycle visits them all; with more, each store is visited once every
ceil(stores / budget) cycles or so (docs/operations.md, "The sweep").

The gauges still cover every store: each shard's totals, counted as the rotation passed through
it, are kept in the shard's `gauges` hash, and the metrics are the sum over the 16 hashes (the
oldest age their maximum), read every cycle. No metric has a store label.

The cursor is written at the end of a cycle: a cycle that fails (Redis went away) leaves it
where it was, and the next visits the same stores again. Two cycles at once (a slow one
overlapping the next tick) read the same cursor and visit the same stores: harmless, every
step is idempotent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import inbox, keys, ledger, metrics, queue
from service.admin import archive
from service.delivery.deps import Deps
from service.logging import get_logger

log = get_logger("service.worker")

#: Stores visited at once: each visit is a few round trips, one after the other; visits of
#: different stores overlap (each on a connection of the pool), so a cycle's time is not the
#: sum of its round trips' latencies.
AT_ONCE = 32


@dataclass(frozen=True)
class Gauges:
    """Grant counts of some stores, and the age of their oldest due grant."""

    pending: float = 0.0
    oldest_age_s: float = 0.0
    failed: float = 0.0
    review: float = 0.0
    parked: float = 0.0

    def __add__(self, other: Gauges) -> Gauges:
        return Gauges(
            pending=self.pending + other.pending,
            oldest_age_s=max(self.oldest_age_s, other.oldest_age_s),
            failed=self.failed + other.failed,
            review=self.review + other.review,
            parked=self.parked + other.parked,
        )

    def fields(self) -> dict[str, str]:
        return {f.name: repr(float(getattr(self, f.name))) for f in dataclasses.fields(self)}

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> Gauges:
        """Read back from a hash; a field missing or not a number counts as 0."""
        return cls(**{f.name: _number(raw.get(f.name)) for f in dataclasses.fields(cls)})


def _number(text: str | None) -> float:
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


def _integer(text: str | None) -> int | None:
    try:
        return int(text or "")
    except ValueError:
        return None


@dataclass(frozen=True)
class Position:
    """Where the rotation stands: in `shard`, after the store `after` (-1: the shard's pass
    has not started)."""

    shard: int = 0
    after: int = -1


@dataclass(frozen=True)
class Segment:
    """The stores of one shard a cycle visits; `starts` / `ends`: the shard's pass starts or
    ends with them (a shard with more stores than the budget takes several cycles)."""

    shard: int
    stores: tuple[int, ...]
    starts: bool
    ends: bool


def plan(
    start: Position, listed: Mapping[int, Sequence[int]], budget: int
) -> tuple[list[Segment], Position]:
    """The stores one cycle visits, at most `budget`, from `start` on, and where the next cycle
    starts. `listed`: the stores of the shards the cycle may reach, each sorted; the plan stops
    at a shard not in it. At most one pass over the shards (16 steps), so no store twice."""
    segments: list[Segment] = []
    left = budget
    shard, after = start.shard, start.after
    for _ in keys.index_shards():
        if left <= 0 or shard not in listed:
            break
        rest = [m for m in listed[shard] if m > after]
        taken = tuple(rest[:left])
        ends = len(taken) == len(rest)
        segments.append(Segment(shard, taken, starts=after < 0, ends=ends))
        left -= len(taken)
        if not ends:
            return segments, Position(shard, taken[-1])
        shard, after = (shard + 1) % keys.INDEX_SHARDS, -1
    return segments, Position(shard, after)


@dataclass(frozen=True)
class Cursor:
    """The stored rotation: its position and the totals of the position's shard so far."""

    position: Position = Position()
    so_far: Gauges = Gauges()

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> Cursor:
        """Anything unreadable starts the rotation over (it costs one pass's gauges)."""
        shard, after = _integer(raw.get("shard")), _integer(raw.get("after"))
        if shard is None or shard not in keys.index_shards() or after is None or after < -1:
            return cls()
        return cls(Position(shard, after), Gauges.from_fields(raw))

    def fields(self) -> dict[str, str]:
        return {"shard": str(self.position.shard), "after": str(self.position.after)} | (
            self.so_far.fields()
        )


@dataclass(frozen=True)
class Listing:
    """The stores of the shards a cycle may reach: sorted per shard, and which of them are
    listed with work (`stores:pending`) and with unknown outcomes (`stores:unknown`)."""

    by_shard: dict[int, list[int]]
    with_work: frozenset[int]
    with_unknown: frozenset[int]


async def read_listing(redis: Redis, start: Position, budget: int) -> Listing:
    """The shards from `start` on, as many as the budget may reach: every shard's size first
    (one pipeline of SCARDs), then the members of those shards (one pipeline)."""
    order = [(start.shard + n) % keys.INDEX_SHARDS for n in keys.index_shards()]
    async with redis.pipeline(transaction=False) as pipe:  # reads of separate keys
        for shard in order:
            pipe.scard(keys.stores_pending(shard))
            pipe.scard(keys.stores_unknown(shard))
        sizes: list[int] = await pipe.execute()
    reach: list[int] = []
    counted = 0
    for n, shard in enumerate(order):
        if counted >= budget:
            break
        reach.append(shard)
        counted += sizes[2 * n] + sizes[2 * n + 1]
    async with redis.pipeline(transaction=False) as pipe:
        for shard in reach:
            pipe.smembers(keys.stores_pending(shard))
            pipe.smembers(keys.stores_unknown(shard))
        found: list[set[str]] = await pipe.execute()
    work = [{int(m) for m in found[2 * n]} for n in range(len(reach))]
    unknown = [{int(m) for m in found[2 * n + 1]} for n in range(len(reach))]
    return Listing(
        by_shard={shard: sorted(work[n] | unknown[n]) for n, shard in enumerate(reach)},
        with_work=frozenset().union(*work),
        with_unknown=frozenset().union(*unknown),
    )


@dataclass
class Report:
    """What one cycle did (its log line and the cron's result)."""

    stores: int = 0
    shards: int = 0
    returned: int = 0
    unknown: int = 0
    flushes: int = 0
    reconciles: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


async def run(deps: Deps) -> Report:
    """One cycle of the sweep: the housekeeping, then this cycle's share of the stores."""
    await _housekeeping(deps)
    report = await visit_stores(deps)
    (log.info if report.returned or report.unknown else log.debug)("sweep", **report.as_dict())
    return report


async def visit_stores(deps: Deps) -> Report:
    """Visit this cycle's stores, move the cursor on, and set the gauges from every shard's."""
    redis, now = deps.redis, ledger.now_ms()
    cursor = Cursor.from_fields(await redis.hgetall(keys.SWEEP_CURSOR))  # type: ignore[misc]
    budget = deps.settings.sweep_stores_per_cycle
    listing = await read_listing(redis, cursor.position, budget)
    segments, position = plan(cursor.position, listing.by_shard, budget)
    report = Report(shards=len(segments))
    settle_ms = now - int(deps.settings.reconcile_after_s * 1000)
    counted: dict[int, Gauges] = {}  # per shard whose pass ended this cycle
    so_far = cursor.so_far
    for segment in segments:
        totals = Gauges() if segment.starts else so_far
        for start in range(0, len(segment.stores), AT_ONCE):
            visits = [
                _visit_store(deps, merchant, listing, settle_ms, report)
                for merchant in segment.stores[start : start + AT_ONCE]
            ]
            # Every visit ends before the cycle goes on or fails (none is left running), and a
            # failure is raised as itself (Redis went away: the cron fails, the cursor stays).
            for gauges in await asyncio.gather(*visits, return_exceptions=True):
                if isinstance(gauges, BaseException):
                    raise gauges
                totals += gauges
        if segment.ends:
            counted[segment.shard] = totals
        so_far = totals if not segment.ends else Gauges()
    _set_grant_gauges(await _save(redis, Cursor(position, so_far), counted, now))
    return report


def _set_grant_gauges(total: Gauges) -> None:
    metrics.PENDING.set(total.pending)
    metrics.OLDEST_PENDING.set(total.oldest_age_s)
    for kind in ("failed", "review", "parked"):
        metrics.ATTENTION.labels(kind).set(getattr(total, kind))


#: How often each worker sets its gauges from Redis (`keep_gauges_fresh`).
GAUGES_EVERY_S = 5.0


async def publish_gauges(deps: Deps) -> None:
    """This process's gauges from what Redis holds: the inbox's backlog, and the grant totals
    the sweep keeps per index shard. Every worker does it on its own clock, so each reports
    the same current figures (the sweep runs on one worker at a time: a worker that has not
    run it lately would otherwise report what it saw then)."""
    waiting = await inbox.backlog(deps.redis, deps.settings.inbox_shards)
    metrics.INBOX_BACKLOG.labels("pending").set(waiting.pending)
    metrics.INBOX_BACKLOG.labels("unread").set(waiting.unread)
    metrics.INBOX_OLDEST.set(waiting.oldest_age_s)
    async with deps.redis.pipeline(transaction=False) as pipe:  # one key a command
        for shard in keys.index_shards():
            pipe.hgetall(keys.sweep_gauges(shard))
        replies = await pipe.execute()
    _set_grant_gauges(sum((Gauges.from_fields(raw) for raw in replies), Gauges()))


async def keep_gauges_fresh(deps: Deps, every_s: float = GAUGES_EVERY_S) -> None:
    """`publish_gauges` every `every_s` for as long as the worker runs (a task of its own); a
    Redis that does not answer leaves the gauges as they were until it does."""
    while True:
        try:
            await publish_gauges(deps)
        except (RedisError, OSError) as exc:
            log.debug("gauges_not_refreshed", error=str(exc))
        await asyncio.sleep(every_s)


async def _visit_store(
    deps: Deps, merchant: int, listing: Listing, settle_ms: int, report: Report
) -> Gauges:
    report.stores += 1
    gauges = Gauges()
    if merchant in listing.with_work:
        gauges = await _visit_store_with_work(deps, merchant, report)
    if merchant in listing.with_unknown and await ledger.unknown_due(
        deps.redis, merchant, settle_ms
    ):
        await queue.enqueue_reconcile(deps.pool, merchant)
        report.reconciles += 1
    return gauges


async def _visit_store_with_work(deps: Deps, merchant: int, report: Report) -> Gauges:
    """Recover the store's lost work and queue what is due; its gauges."""
    overdue = await ledger.verifying_overdue(deps.redis, merchant)
    for order_id in overdue | set(await ledger.asked_overdue(deps.redis, merchant)):
        await queue.enqueue_order_truth(deps.pool, merchant, order_id)
    back, lost = await ledger.sweep_claims(deps.redis, merchant)
    report.returned += back
    report.unknown += lost
    if lost:
        log.error("claims_recovered_unknown", merchant=merchant, grants=lost)
    gauges = Gauges(**await ledger.store_gauges(deps.redis, merchant))
    if await ledger.due_count(deps.redis, merchant):
        # `recreate`: the job this process queued for this window may have been lost with
        # the queue's master; arq refuses the id if it still has it.
        await queue.enqueue_flush(deps.pool, merchant, deps.settings.batch_window_s, recreate=True)
        report.flushes += 1
    else:
        await ledger.forget_store_if_idle(deps.redis, merchant)
    return gauges


async def _save(redis: Redis, cursor: Cursor, counted: Mapping[int, Gauges], now_ms: int) -> Gauges:
    """Write the cursor and the shards counted this cycle; every shard's gauges, summed."""
    async with redis.pipeline(transaction=False) as pipe:  # one key a command, no atomicity
        pipe.hset(keys.SWEEP_CURSOR, mapping=cursor.fields())
        for shard, gauges in counted.items():
            pipe.hset(keys.sweep_gauges(shard), mapping=gauges.fields() | {"at": str(now_ms)})
        for shard in keys.index_shards():
            pipe.hgetall(keys.sweep_gauges(shard))
        replies = await pipe.execute()
    total = Gauges()
    for raw in replies[-keys.INDEX_SHARDS :]:
        total += Gauges.from_fields(raw)
    return total


async def _housekeeping(deps: Deps) -> None:
    """What is not per store: the inbox's idle consumers, the grant archive and log, and
    compaction (a few stores a cycle, its own bound). (The inbox's gauges: `publish_gauges`.)"""
    for stream in (*keys.webhook_streams(deps.settings.inbox_shards), keys.APP_EVENTS_STREAM):
        await inbox.forget_idle_consumers(deps.redis, stream=stream)
    if deps.settings.grant_archive_dir is not None:  # before the log forgets them
        await archive.archive_due(deps.redis, deps.settings.grant_archive_dir, ledger.now_ms())
    await ledger.trim_grant_log(deps.redis)
    compacted = await ledger.compact_due_stores(
        deps.redis, ledger.now_ms(), deps.settings.ledger_retention_days
    )
    if compacted.compacted or compacted.retired:
        log.info(
            "ledger_compacted",
            stores=compacted.stores,
            orders=compacted.compacted,
            retired=compacted.retired,
            kept_full=compacted.kept_full,
        )
