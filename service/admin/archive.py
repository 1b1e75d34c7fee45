"""Grant records leave Redis through an archive: JSONL files, one per day, in GRANT_ARCHIVE_DIR.

A settled grant's record expires `SETTLED_GRANT_TTL_S` (90 days) after it settled. With
`GRANT_ARCHIVE_DIR` set, the worker's sweep takes them out first: every settled (sent or
netted) grant created `ARCHIVE_AFTER_DAYS` ago or more is written to
`<dir>/grants-<its creation day, UTC>.jsonl` in `admin export`'s JSONL format, the files are
fsynced, and only then is the record deleted from Redis (with its id in the grant log). Ten
days before the earliest its TTL can fire: a worker down for less than that loses nothing.

A process that dies mid-way loses nothing and writes nothing twice. The grant log is kept per
index shard (service/keys.py), and the archiver works a shard at a time: before appending, it
records each file's length beside the shard's log (`sr:{x:n}:archive-intent`); once the files
are on disk, one script of the shard's slot takes the batch's ids out of the log, clears the
note and moves the shard's cursor, and only then are the records deleted (each in its store's
slot, so not in that script). A run that finds a note (its predecessor died before that script)
cuts each file back to its noted length and does the batch again; a run that died after it left
records no log lists any more, which expire with their TTL like any settled grant (and are in
the files). One archiver runs at a time (`sr:archive-lock`): the files are its own.

Not archived: a grant still unsettled when the grant log drops its id (90 days after it was
made; an unknown outcome or a review left that long). Its record stays in Redis until it
settles, then expires 90 days later.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Iterable
from pathlib import Path

import orjson
from redis.asyncio import Redis

from service import keys, lua
from service.admin.export import export_line
from service.admin.queries import grant_view
from service.logging import get_logger

log = get_logger("service.admin")

#: Settled grants this old (from creation) are archived: ten days before their 90-day TTL
#: (which counts from settlement, never earlier than creation) can remove them.
ARCHIVE_AFTER_DAYS = 80
BATCH = 500
DAY_MS = 86_400_000
_SETTLED = frozenset({"sent", "netted"})
_LOCK_MS = 120_000

_RELEASE = lua.Script("""#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# KEYS: the shard's grant log, its archive note, its cursor (one slot); ARGV: the cursor's new
# value, then the ids the batch is done with. The batch's commit point.
_DONE = lua.Script("""#!lua
for i = 2, #ARGV, 1000 do
  redis.call('ZREM', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
return 1
""")


def day_file(directory: Path, created_ms: int) -> Path:
    day = dt.datetime.fromtimestamp(created_ms / 1000, dt.UTC).date().isoformat()
    return directory / f"grants-{day}.jsonl"


async def archive_due(redis: Redis, directory: Path, now_ms: int, *, batch: int = BATCH) -> int:
    """Archive a batch of due grant records from each index shard that has some; returns how
    many left Redis for the files."""
    cutoff = now_ms - ARCHIVE_AFTER_DAYS * DAY_MS
    async with redis.pipeline(transaction=False) as pipe:  # one look at every shard, read only
        for shard in keys.index_shards():
            pipe.exists(keys.archive_intent(shard))
            pipe.zrangebyscore(keys.grant_log(shard), "-inf", cutoff, start=0, num=1)
        looks = await pipe.execute()
    shards = [s for s in keys.index_shards() if looks[2 * s] or looks[2 * s + 1]]
    if not shards:
        return 0
    token = os.urandom(8).hex()
    if not await redis.set(keys.ARCHIVE_LOCK, token, nx=True, px=_LOCK_MS):
        return 0  # another worker is archiving
    try:
        archived = 0
        for shard in shards:
            await _finish_interrupted(redis, shard)
            archived += await _archive_batch(redis, shard, directory, cutoff, batch)
        return archived
    finally:
        await _RELEASE.run(redis, [keys.ARCHIVE_LOCK], token)


async def _finish_interrupted(redis: Redis, shard: int) -> None:
    """A batch whose files were written and whose ids are still in the log: its lines go (the
    records are still in Redis, the batch is done again)."""
    note = await redis.get(keys.archive_intent(shard))
    if note is None:
        return
    lengths: dict[str, int] = orjson.loads(note)
    await asyncio.to_thread(_truncate, lengths)
    await redis.delete(keys.archive_intent(shard))
    log.warning("grant_archive_resumed", files=sorted(lengths))


async def _archive_batch(redis: Redis, shard: int, directory: Path, cutoff: int, batch: int) -> int:
    cursor = await redis.get(keys.archive_cursor(shard)) or "-inf"
    found: list[tuple[str, float]] = await redis.zrangebyscore(
        keys.grant_log(shard), cursor, cutoff, start=0, num=batch, withscores=True
    )
    if not found:
        # At the end: start over next time (grants skipped as unsettled are looked at again).
        await redis.delete(keys.archive_cursor(shard))
        return 0
    ids = [grant_id for grant_id, _ in found]
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hgetall(keys.grant(grant_id))
        docs: list[dict[str, str]] = await pipe.execute()
    settled = [d for d in docs if d.get("state") in _SETTLED]
    gone = [g for g, d in zip(ids, docs, strict=True) if not d]  # expired, or never made
    files: dict[Path, list[str]] = {}
    for doc in settled:
        path = day_file(directory, int(doc.get("created_ms") or 0))
        files.setdefault(path, []).append(export_line(grant_view(doc), "jsonl"))
    if files:
        lengths = await asyncio.to_thread(_lengths, directory, files)
        await redis.set(keys.archive_intent(shard), orjson.dumps(lengths))
        await asyncio.to_thread(_append, files)
    done = [d["id"] for d in settled] + gone
    await _DONE.run(
        redis,
        [keys.grant_log(shard), keys.archive_intent(shard), keys.archive_cursor(shard)],
        f"({int(found[-1][1])}" if len(found) == batch else "-inf",
        *done,
    )
    # Each record in its store's slot: a pipeline, not a transaction (the log no longer lists
    # them, so a record a crash leaves here is never archived twice; it expires with its TTL).
    async with redis.pipeline(transaction=False) as pipe:
        for doc in settled:
            pipe.delete(keys.grant(doc["id"]))
        await pipe.execute()
    if settled:
        log.info("grants_archived", grants=len(settled), files=sorted(p.name for p in files))
    return len(settled)


def _lengths(directory: Path, files: Iterable[Path]) -> dict[str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    return {str(p): p.stat().st_size if p.exists() else 0 for p in files}


def _append(files: dict[Path, list[str]]) -> None:
    """Append each file's lines and fsync it (and the folder, for a file it created)."""
    created = False
    for path, lines in files.items():
        created = created or not path.exists()
        with path.open("a", encoding="utf-8") as out:
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
    if created:
        folder = os.open(next(iter(files)).parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _truncate(lengths: dict[str, int]) -> None:
    for name, length in lengths.items():
        path = Path(name)
        if path.exists() and path.stat().st_size > length:
            with path.open("r+b") as out:
                out.truncate(length)
                os.fsync(out.fileno())
