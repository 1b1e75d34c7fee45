"""The web's writes: each webhook delivery persisted before its 200.

Rule events go to the inbox stream (read by the workers' `service.inbox`), group-committed in
one script call; app lifecycle events go to a stream of their own (`sr:{inbox}:app-events`, the
same script), which the workers empty as they process it. Both are on the state store
(`REDIS_URL`), never on arq's queue, whose failover may lose its last writes. This module is
the web's side of ingest only: nothing here reads a stream or processes an event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from service import body_codec
from service.keys import APP_EVENTS_STREAM, INBOX_GROUP, SEEN_PREFIX, WEBHOOK_STREAM
from service.settings import Durability

#: `WEBHOOK_DURABILITY` -> the replicas `WAITAOF` asks for (None: no wait).
REPLICAS_TO_WAIT_FOR: dict[Durability, int | None] = {"buffered": None, "fsync": 0, "replica": 1}


async def ensure_group(redis: Redis, stream: str = WEBHOOK_STREAM) -> None:
    """Create the consumer group if it is missing, from the stream's start: entries without a
    group were never processed (a new stream, or a group lost with a restored Redis; the ledger
    makes any processed twice harmless)."""
    try:
        await redis.xgroup_create(stream, INBOX_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# KEYS: the inbox stream, then each delivery's "seen" key; ARGV: seen TTL s, MINID ("" = keep
# all), the workers' group, then per delivery: its JSON header [merchant, event, delivery,
# trace id] and its body (two arguments, not five: packing each one costs the web process).
# Returns 1 (accepted) or 0 (seen before) per delivery, in order. The webhook's whole Redis
# cost, for a group of deliveries at once (`EventWriter`): each is refused if seen, else marked
# seen and appended to the inbox (which is also the replay log); a script runs atomically. A
# stream this creates gets the workers' group with its first entry, so no entry can fall before
# the group's start, whenever a worker first looks. A delivery seen before is written again
# (its mark, unchanged): a write of this call, after the first attempt's, so the `WAITAOF` that
# follows covers the first attempt too. Without it, a re-send of a delivery whose first attempt
# answered 503 (written, not yet on disk) would answer 200 at once, and a crash could still
# lose it.
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
    redis.call('SET', KEYS[i], '1', 'XX', 'KEEPTTL')
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


class NotDurable(RedisError):
    """Redis did not confirm, within the timeout, that a write is in its AOF on disk (or on a
    replica's, as `WEBHOOK_DURABILITY` asks): what it holds may still be lost, so the
    deliveries answer 503 like any other failed write, and Salla sends them again."""


def _held_connection(pool: Redis) -> Redis:
    """A client on one connection of its own, like the pool's, that never sends a command
    again by itself (redis-py does after a timeout when the URL says `retry_on_timeout`): a
    `WAITAOF` sent again on a new connection would wait for that connection's writes (none)
    and confirm at once what was never confirmed. A failed command fails its call; the next
    call connects again."""
    source = pool.connection_pool
    options = {
        **source.connection_kwargs,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "retry_on_error": [],
    }
    one = ConnectionPool(connection_class=source.connection_class, max_connections=1, **options)
    return Redis(connection_pool=one, single_connection_client=True)


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
    not a Redis command. Each delivery still gets its own answer: a Redis error fails exactly the
    deliveries of that call (they answer 503; Salla re-sends, and the "seen" mark makes any that
    did land a duplicate, not a loss). App events (few) are written one call each
    (`accept_app_event`), with the same script, on the same connection.

    `durability` (`WEBHOOK_DURABILITY`): with `fsync` or `replica`, each call is followed, on
    the same connection, by one `WAITAOF` (its cost shared by the call's deliveries); a call
    Redis does not confirm within `durability_timeout_s` fails as a whole (`NotDurable`).
    """

    def __init__(
        self,
        pool: Redis,
        *,
        seen_ttl_s: int,
        retention_days: int,
        durability: Durability = "buffered",
        durability_timeout_s: float = 2.0,
    ) -> None:
        self.pool = pool
        self.seen_ttl_s = seen_ttl_s
        self.retention_days = retention_days
        self.durability = durability
        self._replicas = REPLICAS_TO_WAIT_FOR[durability]
        self._wait_ms = max(1, round(durability_timeout_s * 1000))
        # A connection held for the writer: no pool checkout (and its liveness probe) per call,
        # and the connection `WAITAOF` asks about is the one that wrote.
        self._conn = _held_connection(pool)
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
                # delivery that landed answer as a duplicate, never land twice (and the second
                # call writes its marks again, so the wait below covers the first call's writes).
                results = await self._accept(keys=keys, args=args)
            await self._wait_durable()
        except Exception as exc:  # nothing of this call is known to be persisted: all fail
            results = [exc] * len(batch)
        except BaseException:  # cancelled: the process is stopping
            _settle(batch, [RedisConnectionError("the event writer stopped")] * len(batch))
            raise
        _settle(batch, results)

    async def _wait_durable(self) -> None:
        """Return once every write this connection made is in Redis's AOF on disk (and in a
        replica's, for `replica`); raise `NotDurable` if that takes longer than the timeout.
        `WAITAOF` counts the writes of the connection it is sent on, up to its last one."""
        if self._replicas is None:  # buffered: Redis fsyncs its AOF each second on its own
            return
        local, replicas = await self._conn.waitaof(1, self._replicas, self._wait_ms)
        if local < 1 or replicas < self._replicas:
            where = "on disk" if self._replicas == 0 else f"on disk and on {self._replicas} replica"
            raise NotDurable(
                f"Redis did not confirm the write {where} within {self._wait_ms} ms"
                f" (WAITAOF: local {local}, replicas {replicas})"
            )

    async def aclose(self) -> None:
        """Close the writer's connection."""
        await self._conn.aclose(close_connection_pool=True)

    def _minid(self) -> str:
        """The oldest entry id retention keeps ("" keeps all)."""
        if self.retention_days <= 0:
            return ""
        return str(int((time.time() - self.retention_days * 86400) * 1000))

    async def accept_app_event(
        self, *, merchant: int, event: str, delivery: str, body: bytes, trace_id: str
    ) -> bool:
        """Persist one app lifecycle event in its stream; False when it was accepted before.

        Marked seen as it is written, as the inbox's deliveries are: a duplicate that arrives
        before a worker processed the first is refused here (lifecycle handlers are upserts
        ordered by event time, so one processed twice would be harmless too). Never retained:
        the worker deletes it once processed (service/inbox.py). On the writer's own
        connection, so the same `WAITAOF` covers it (a call of the group commit may run
        between the two: the wait then covers that call's writes too, which is harmless).
        """
        header = orjson.dumps([str(merchant), event, delivery, trace_id])
        keys: list[Any] = [APP_EVENTS_STREAM, SEEN_PREFIX + delivery]
        args: list[Any] = [self.seen_ttl_s, "", INBOX_GROUP, header, body]
        try:
            results: list[Any] = await self._accept(keys=keys, args=args)
        except RedisConnectionError:  # the held connection went stale: once more, anew
            results = await self._accept(keys=keys, args=args)
        await self._wait_durable()
        return bool(results[0])
