"""The ledger's grants created in a time range, as JSONL or CSV, a page at a time."""

from __future__ import annotations

import asyncio
import csv
import heapq
import io
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from redis.asyncio import Redis

from service import keys
from service.admin.queries import grant_docs, grant_view

#: The columns of a CSV export, in order (JSONL lines carry the same keys).
EXPORT_FIELDS = (
    "grant_id",
    "merchant",
    "customer",
    "rule",
    "scope",
    "type",
    "points",
    "signed_points",
    "reason",
    "state",
    "created_at",
    "sent_at",
    "batch",
    "attempts",
    "error",
    "trace_id",
)
PAGE = 500


async def count_grants(redis: Redis, start_ms: int, end_ms: int) -> int:
    async with redis.pipeline(transaction=False) as pipe:  # a count per shard of the log
        for shard in keys.index_shards():
            pipe.zcount(keys.grant_log(shard), start_ms, f"({end_ms}")
        return sum(await pipe.execute())


async def export_grants(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Grants created in [start_ms, end_ms), oldest first, a page at a time: the shards of the
    grant log merged by creation (one store's: its shard alone)."""
    shards = keys.index_shards() if merchant is None else [keys.index_shard(merchant)]
    page: list[str] = []
    async for grant_id in _merged_log(redis, shards, start_ms, end_ms):
        page.append(grant_id)
        if len(page) == PAGE:
            for row in await _rows(redis, page, merchant):
                yield row
            page = []
    for row in await _rows(redis, page, merchant):
        yield row


async def _rows(redis: Redis, ids: list[str], merchant: int | None) -> list[dict[str, Any]]:
    docs = await grant_docs(redis, ids) if ids else []
    return [grant_view(d) for d in docs if merchant is None or int(d["merchant"]) == merchant]


async def _merged_log(
    redis: Redis, shards: Iterable[int], start_ms: int, end_ms: int
) -> AsyncIterator[str]:
    """The grant ids of the shards' logs in [start_ms, end_ms), by creation (ties by id, as a
    sorted set orders them)."""
    logs = [_shard_log(redis, shard, start_ms, end_ms) for shard in shards]
    heads: list[tuple[tuple[float, str], int]] = []
    for i, log in enumerate(logs):
        first = await anext(log, None)
        if first is not None:
            heads.append((first, i))
    heapq.heapify(heads)
    while heads:
        (_, grant_id), i = heads[0]
        yield grant_id
        following = await anext(logs[i], None)
        if following is None:
            heapq.heappop(heads)
        else:
            heapq.heapreplace(heads, (following, i))


async def _shard_log(
    redis: Redis, shard: int, start_ms: int, end_ms: int
) -> AsyncIterator[tuple[float, str]]:
    offset = 0
    while True:
        found: list[tuple[str, float]] = await redis.zrangebyscore(
            keys.grant_log(shard), start_ms, f"({end_ms}", start=offset, num=PAGE, withscores=True
        )
        if not found:
            return
        offset += len(found)
        for grant_id, score in found:
            yield score, grant_id


def csv_header() -> str:
    return _csv_line(dict(zip(EXPORT_FIELDS, EXPORT_FIELDS, strict=True)))


def _csv_line(row: dict[str, Any]) -> str:
    out = io.StringIO()
    csv.DictWriter(out, EXPORT_FIELDS, extrasaction="ignore", lineterminator="\n").writerow(
        {k: "" if row.get(k) is None else row[k] for k in EXPORT_FIELDS}
    )
    return out.getvalue()


def export_line(row: dict[str, Any], fmt: str) -> str:
    if fmt == "csv":
        return _csv_line(row)
    return json.dumps(row, ensure_ascii=False) + "\n"


async def write_rows(
    redis: Redis,
    out: IO[str],
    start_ms: int,
    end_ms: int,
    *,
    merchant: int | None,
    fmt: str,
    stop: asyncio.Event,
    advance: Callable[[int], Any],
) -> int | None:
    """Write the range's grants to `out`, calling `advance(1)` after each: how many were
    written, or None when `stop` was set before the end."""
    written = 0
    async for row in export_grants(redis, start_ms, end_ms, merchant):
        if stop.is_set():
            return None
        out.write(export_line(row, fmt))
        written += 1
        advance(1)
    return written


@dataclass(frozen=True, slots=True)
class AtomicFile:
    """An export file that appears only when complete: written as `<path>.partial`, renamed
    by `commit`, removed by `discard`."""

    path: Path

    @property
    def partial(self) -> Path:
        return self.path.with_name(self.path.name + ".partial")

    def open(self) -> IO[str]:
        return self.partial.open("w", encoding="utf-8", newline="")

    def commit(self) -> None:
        self.partial.replace(self.path)

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
