"""The ledger's grants created in a time range, as JSONL or CSV, a page at a time."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator, Callable
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
    return int(await redis.zcount(keys.GRANT_LOG, start_ms, f"({end_ms}"))


async def export_grants(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Grants created in [start_ms, end_ms), oldest first, a page at a time."""
    offset = 0
    while True:
        ids: list[str] = await redis.zrangebyscore(
            keys.GRANT_LOG, start_ms, f"({end_ms}", start=offset, num=PAGE
        )
        if not ids:
            return
        offset += len(ids)
        for doc in await grant_docs(redis, ids):
            if merchant is None or int(doc["merchant"]) == merchant:
                yield grant_view(doc)


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
