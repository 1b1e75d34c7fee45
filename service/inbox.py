"""The inbox: persisted webhooks, read by workers in batches through a Redis consumer group.

The web process writes each accepted webhook once, atomically with its "seen" mark, as an
entry of the `sr:{inbox}:webhooks` stream (the same entry later serves replay). Workers read the
stream as the consumer group `workers`: each entry goes to one worker, stays in the group's
pending list until that worker acknowledges it, and is claimed by another worker if the first
one dies. A batch of up to `INBOX_BATCH` entries costs one read and one acknowledgement, where
one arq job per webhook cost arq's whole job cycle (about 1 ms of CPU here) per event. What is
done with a batch is the handler's business (service/batch.py): this module reads, claims,
acknowledges and gives up, and imports no processing code.

App lifecycle events are not in that stream (they carry the store's tokens and the stream is
kept for days): they have a stream of their own, `sr:{inbox}:app-events`, read by a second
`Inbox` of each worker (`stream=`) with `keep_for_replay=False`: an entry is deleted as it is
acknowledged, so a token stays in Redis only until its event (and the events written next to
it) are processed. Not on arq's queue: that may live on a Redis whose failover can
lose its last writes (service/queue.py); this stream is state, on `REDIS_URL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import StreamIdT

from service import body_codec, keys, lua, metrics, state_store
from service.ingest import ensure_group  # the stream and its group: made by whoever comes first
from service.logging import get_logger

log = get_logger("service.inbox")

GROUP = keys.INBOX_GROUP
WEBHOOK_STREAM = keys.WEBHOOK_STREAM
_REDIS_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, *state_store.FAILING_OVER)


# KEYS[1] the inbox; ARGV[1] the group, ARGV[2] how many unread entries to count at most.
# Returns {pending, unread, id of the oldest unprocessed entry or ""}. Redis 7 reports the
# group's lag; on 6.2 the unread entries are counted (bounded: the count is a gauge's input).
BACKLOG_SCRIPT = lua.Script("""#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, ''} end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  if f['name'] == ARGV[1] then
    local first = redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+', 'COUNT', 1)
    local unread = #first
    if type(f['lag']) == 'number' then
      unread = f['lag']
    elseif unread > 0 then
      unread = #redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+',
                           'COUNT', tonumber(ARGV[2]))
    end
    local oldest = ''
    if f['pending'] > 0 then
      oldest = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
    elseif unread > 0 then
      oldest = first[1][1]
    end
    return {f['pending'], unread, oldest}
  end
end
return {0, redis.call('XLEN', KEYS[1]), ''}
""")

#: `backlog` counts unread entries up to this many on Redis 6.2 (Redis 7 knows the number).
UNREAD_COUNT_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Backlog:
    """Webhooks accepted and not processed yet."""

    pending: int  # read by a worker, not acknowledged
    unread: int  # not read by any worker yet
    oldest_age_s: float  # age of the oldest of them (0 when there is none)

    @property
    def total(self) -> int:
        return self.pending + self.unread


async def backlog(redis: Redis, shards: int = 1) -> Backlog:
    """Summed over the inbox's shards (`INBOX_SHARDS`); the age is the oldest shard's."""
    pending = unread = 0
    age = 0.0
    for stream in keys.webhook_streams(shards):
        held, new, oldest = await BACKLOG_SCRIPT.run(
            redis, [stream], GROUP, str(UNREAD_COUNT_LIMIT)
        )
        pending, unread = pending + int(held), unread + int(new)
        oldest = oldest.decode() if isinstance(oldest, bytes) else str(oldest)
        if oldest:
            age = max(age, time.time() - int(oldest.split("-")[0]) / 1000)
    return Backlog(pending, unread, round(age, 3))


async def forget_idle_consumers(
    redis: Redis, idle_s: float = 3600.0, stream: str = WEBHOOK_STREAM
) -> int:
    """Remove consumers (worker processes) that hold nothing and were not seen for `idle_s`:
    every worker that ever ran leaves one behind."""
    try:
        consumers = await redis.xinfo_consumers(stream, GROUP)
    except ResponseError:
        return 0
    gone = 0
    for consumer in consumers:
        if consumer["pending"] == 0 and consumer["idle"] > idle_s * 1000:
            await redis.xgroup_delconsumer(stream, GROUP, consumer["name"])
            gone += 1
    return gone


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Entry:
    stream_id: bytes
    merchant: int
    delivery: str
    trace_id: str
    body: bytes


#: What the reader hands each batch to: it returns the stream ids of the entries that are done
#: (processed, or refused for good); the others stay pending.
Handler = Callable[[Sequence[Entry]], Awaitable[list[bytes]]]


def _body(kept: bytes) -> bytes:
    """The body as received; one that does not decode is handed on as kept, so processing
    refuses it with its usual log line instead of it vanishing here."""
    try:
        return body_codec.decode(kept)
    except ValueError:
        return kept


def _entry(stream_id: bytes, fields: dict[bytes, bytes] | None) -> Entry | None:
    """A stream entry as the web wrote it; None for one that is gone or not ours."""
    if not fields or b"body" not in fields:
        return None
    try:
        merchant = int(fields.get(b"merchant", b"0"))
    except ValueError:
        merchant = 0
    return Entry(
        stream_id,
        merchant,
        fields.get(b"delivery", b"").decode(),
        fields.get(b"trace_id", b"").decode(),
        _body(fields[b"body"]),
    )


class Inbox:
    """One worker's reader of the inbox. `run()` until `stop()`; a batch in progress finishes.

    Each entry is processed at least once; the ledger makes a second time harmless. An entry
    whose processing fails (Redis unreachable, a bug) is not acknowledged: after `claim_idle_s`
    any worker claims it again, up to `max_tries` deliveries, after which it is given up with
    an `event_abandoned` error (it stays in the stream: `admin replay` can run it again).
    """

    def __init__(
        self,
        redis: Redis,
        handler: Handler,
        *,
        stream: str = WEBHOOK_STREAM,
        keep_for_replay: bool = True,
        consumer: str | None = None,
        batch: int = 100,
        block_ms: int = 500,
        claim_idle_s: float = 60.0,
        max_tries: int = 10,
    ) -> None:
        self.handler = handler
        self.stream = stream
        self.keep_for_replay = keep_for_replay  # else an entry goes once acknowledged
        self.redis = redis  # binary replies (bodies are bytes)
        self.consumer = consumer or consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_tries = max_tries
        self._stopping = asyncio.Event()
        self._next_claim = 0.0
        #: Where to go on through this consumer's own unacknowledged entries, once, before new
        #: ones: at start (a worker restarted under the same name) and after an error (Redis
        #: went away before the XACK). Entries that fail again are left to `_claim_stale`.
        self._own_from: str | None = "0"

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await ensure_group(self.redis, self.stream)
        while not self._stopping.is_set():
            try:
                if self._own_from is not None:
                    entries = await self._read(own_from=self._own_from)
                    self._own_from = (
                        entries[-1].stream_id.decode() if len(entries) >= self.batch else None
                    )
                    await self.process(entries)
                    continue
                if time.monotonic() >= self._next_claim:
                    self._next_claim = time.monotonic() + min(self.claim_idle_ms / 1000 / 2, 5.0)
                    await self.process(await self._claim_stale())
                await self.process(await self._read())
            except _REDIS_TRANSIENT as exc:
                log.warning("inbox_redis_unavailable", error=repr(exc))
                self._own_from = "0"
                await self._pause(1.0)
            except Exception:  # the reader must outlive anything one round can raise
                log.exception("inbox_error")
                self._own_from = "0"
                await self._pause(1.0)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _read(self, *, own_from: str | None = None) -> list[Entry]:
        """New entries, or the ones this consumer read and did not acknowledge after `own_from`."""
        try:
            reply = await self.redis.xreadgroup(
                GROUP,
                self.consumer,
                {self.stream: own_from if own_from is not None else ">"},
                count=self.batch,
                block=None if own_from is not None else self.block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("inbox_group_recreated", stream=self.stream)
            await ensure_group(self.redis, self.stream)
            return []
        entries: list[Entry] = []
        gone: list[bytes] = []
        for _stream, items in reply or []:
            for stream_id, fields in items:
                entry = _entry(stream_id, fields)
                if entry is None:
                    gone.append(stream_id)
                else:
                    entries.append(entry)
        if gone:
            await self.redis.xack(self.stream, GROUP, *gone)
        return entries

    async def _claim_stale(self) -> list[Entry]:
        """Entries other workers (or this one) took and did not acknowledge in time."""
        try:
            pending = await self.redis.xpending_range(
                self.stream, GROUP, min="-", max="+", count=self.batch, idle=self.claim_idle_ms
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        if not pending:
            return []
        retry: list[StreamIdT] = []
        for item in pending:
            if item["times_delivered"] >= self.max_tries:
                await self._abandon(item["message_id"], item["times_delivered"])
            else:
                retry.append(item["message_id"])
        if not retry:
            return []
        claimed = await self.redis.xclaim(
            self.stream, GROUP, self.consumer, self.claim_idle_ms, retry
        )
        entries = [e for sid, fields in claimed if (e := _entry(sid, fields)) is not None]
        found = {e.stream_id for e in entries}
        if missing := [sid for sid in retry if sid not in found]:  # trimmed or deleted meanwhile
            await self.redis.xack(self.stream, GROUP, *missing)
        if entries:
            log.warning("inbox_entries_claimed", count=len(entries))
        return entries

    async def _abandon(self, stream_id: bytes, tries: int) -> None:
        fields = await self.redis.xrange(self.stream, min=stream_id, max=stream_id)
        entry = _entry(stream_id, fields[0][1]) if fields else None
        log.error(
            "event_abandoned",
            stream=self.stream,
            stream_id=stream_id.decode(),
            tries=tries,
            delivery=entry.delivery if entry else None,
            trace_id=entry.trace_id if entry else None,
            merchant=entry.merchant if entry else None,
            why="processing failed every time; "
            + (
                "the webhook stays in the replay log"
                if self.keep_for_replay
                else "it was deleted (this stream keeps nothing)"
            ),
        )
        metrics.EVENTS.labels("abandoned").inc()
        await self._done([stream_id])

    async def process(self, entries: Sequence[Entry]) -> int:
        """Hand a batch to the handler; acknowledge the entries it says are done (an entry it
        could not process stays pending: this worker or another tries it again)."""
        if not entries:
            return 0
        done = await self.handler(entries)
        await self._done(done)
        return len(done)

    async def _done(self, stream_ids: list[bytes]) -> None:
        """Acknowledge; in a stream that keeps nothing, delete too."""
        if not stream_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, GROUP, *stream_ids)
            if not self.keep_for_replay:
                # XDEL marks an entry deleted inside its node (up to 100 entries or 4 KB); the
                # node, and the entry's bytes in memory and in a snapshot, go with the node's
                # last live entry: once every event in it is processed.
                pipe.xdel(self.stream, *stream_ids)
            await pipe.execute()
