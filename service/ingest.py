"""The web's writes: each webhook delivery persisted before its 200.

Rule events go to the inbox stream (read by the workers' `service.inbox`), group-committed in
one script call; app lifecycle events become arq jobs through `service.queue`. This module is
the web's side of ingest only: nothing here reads the inbox or processes an event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from service import autopipe, body_codec, queue
from service.keys import INBOX_GROUP, SEEN_PREFIX, WEBHOOK_STREAM

# KEYS: the inbox stream, then each delivery's "seen" key; ARGV: seen TTL s, MINID ("" = keep
# all), the workers' group, then per delivery: its JSON header [merchant, event, delivery,
# trace id] and its body (two arguments, not five: packing each one costs the web process).
# Returns 1 (accepted) or 0 (seen before) per delivery, in order. The webhook's whole Redis
# cost, for a group of deliveries at once (`EventWriter`): each is refused if seen, else marked
# seen and appended to the inbox (which is also the replay log); a script runs atomically. A
# stream this creates gets the workers' group with its first entry, so no entry can fall before
# the group's start, whenever a worker first looks.
ACCEPT_WEBHOOKS = """
local stream, ttl, minid = KEYS[1], ARGV[1], ARGV[2]
local new = redis.call('EXISTS', stream) == 0
local out = {}
for i = 2, #KEYS do
  local a = 4 + (i - 2) * 2
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    local h = cjson.decode(ARGV[a])
    if minid == '' then
      redis.call('XADD', stream, '*', 'merchant', h[1], 'event', h[2],
                 'delivery', h[3], 'trace_id', h[4], 'body', ARGV[a + 1])
    else
      redis.call('XADD', stream, 'MINID', minid, '*', 'merchant', h[1], 'event', h[2],
                 'delivery', h[3], 'trace_id', h[4], 'body', ARGV[a + 1])
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if new and redis.call('EXISTS', stream) == 1 then
  redis.call('XGROUP', 'CREATE', stream, ARGV[3], '0')
end
return out
"""

#: Deliveries per `ACCEPT_WEBHOOKS` call at most: more waiting go in the next call.
ACCEPT_BATCH = 256


def _settle(batch: list[tuple[str, list[Any], asyncio.Future[Any]]], results: list[Any]) -> None:
    """Give each waiting delivery its answer: accepted (True), seen before, or the error."""
    for (_, _, future), result in zip(batch, results, strict=True):
        if future.done():  # its caller was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(bool(result))


class EventWriter:
    """The webhook path's writes. Inbox deliveries are group-committed: one `ACCEPT_WEBHOOKS`
    call at a time, on a connection of its own, carries every delivery that arrived while the
    previous call was out (a burst's deliveries share a round trip and a script run; a lone
    one goes at once). Per delivery, the web process pays a list append and an awaited future,
    not a Redis command. App events (few; each its own arq job) go through the pool's
    auto-pipeline. Each delivery still gets its own answer: a Redis error fails exactly the
    deliveries of that call (they answer 503; Salla re-sends, and the "seen" mark makes any that
    did land a duplicate, not a loss).
    """

    def __init__(self, pool: ArqRedis, *, seen_ttl_s: int, retention_days: int) -> None:
        self.pool = pool
        self.seen_ttl_s = seen_ttl_s
        self.retention_days = retention_days
        # A connection held for the writer: no pool checkout (and its liveness probe) per call.
        self._conn = pool.client()
        self._accept = self._conn.register_script(ACCEPT_WEBHOOKS)  # EVALSHA; loads if missing
        self._waiting: list[tuple[str, list[Any], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def accept(
        self, *, merchant: int, event: str, delivery: str, body: bytes, trace_id: str
    ) -> asyncio.Future[Any]:
        """Persist one delivery in the inbox; the future's result is False when it was accepted
        before, true otherwise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        header = orjson.dumps([str(merchant), event, delivery, trace_id])
        kept = body_codec.encode(body)  # compressed for the replay log (service/body_codec.py)
        self._waiting.append((SEEN_PREFIX + delivery, [header, kept], future))
        if self._sender is None:  # its first step runs after this loop turn's other requests
            self._sender = loop.create_task(self._send_waiting())
        return future

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:ACCEPT_BATCH]
                del self._waiting[:ACCEPT_BATCH]
                await self._send(batch)
        finally:
            self._sender = None
            # Stopped (the process is shutting down): nobody will send these; say so.
            for _, _, future in self._waiting:
                if not future.done():
                    future.set_exception(RedisConnectionError("the event writer stopped"))
            self._waiting.clear()

    async def _send(self, batch: list[tuple[str, list[Any], asyncio.Future[Any]]]) -> None:
        keys: list[Any] = [WEBHOOK_STREAM]
        args: list[Any] = [self.seen_ttl_s, self._minid(), INBOX_GROUP]
        for seen_key, fields, _ in batch:
            keys.append(seen_key)
            args += fields
        try:
            try:
                results: list[Any] = await self._accept(keys=keys, args=args)
            except RedisConnectionError:
                # The held connection went stale (say Redis restarted since the last call): once
                # more, on a new one. Safe even if the first call ran: "seen" marks make a
                # delivery that landed answer as a duplicate, never land twice.
                results = await self._accept(keys=keys, args=args)
        except Exception as exc:  # nothing of this call is known to be persisted: all fail
            results = [exc] * len(batch)
        except BaseException:  # cancelled: the process is stopping
            _settle(batch, [RedisConnectionError("the event writer stopped")] * len(batch))
            raise
        _settle(batch, results)

    async def aclose(self) -> None:
        """Give the writer's connection back to the pool."""
        await self._conn.aclose()

    def _minid(self) -> str:
        """The oldest entry id retention keeps ("" keeps all)."""
        if self.retention_days <= 0:
            return ""
        return str(int((time.time() - self.retention_days * 86400) * 1000))

    async def enqueue(self, delivery: str, body: bytes, trace_id: str) -> bool:
        """Persist one delivery as its own arq job (app lifecycle events); False when it is
        queued or was processed already (the worker marks it seen once it is processed).

        Through arq's public `enqueue_job` (about four round trips: the "seen" check, then
        arq's WATCH, EXISTS and MULTI/EXEC) rather than a script writing arq's job format by
        hand in one: that format is arq's private business and changes with it. The cost is
        paid by app lifecycle events only (a handful per store's lifetime); every webhook for
        the rules still costs its share of one group-committed script call (`accept`). The
        check and the enqueue are two steps: a duplicate that lands between them runs the job
        a second time, which lifecycle handlers (upserts, ordered by event time) allow.
        """
        if await autopipe.auto(self.pool).execute("EXISTS", SEEN_PREFIX + delivery):
            return False
        return await queue.enqueue(
            self.pool, queue.PROCESS_EVENT, body, delivery, trace_id, job_id=f"evt:{delivery}"
        )
