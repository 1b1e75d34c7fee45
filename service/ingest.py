"""The web's writes: each webhook delivery persisted before its 200.

Rule events go to the inbox stream (read by the workers' `service.inbox`), group-committed in
one script call; app lifecycle events go to a stream of their own (`sr:{inbox}:app-events`, the
same script), which the workers empty as they process it. Both are on the state store
(`REDIS_URL`), never on arq's queue, whose failover may lose its last writes. This module is
the web's side of ingest only: nothing here reads a stream or processes an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from service import body_codec, keys, state_store
from service.keys import APP_EVENTS_STREAM, INBOX_GROUP, WEBHOOK_STREAM
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
ACCEPT_WEBHOOKS = """#!lua
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


def _settle(batch: list[tuple[str, list[Any], asyncio.Future[Any]]], results: list[Any]) -> None:
    """Give each waiting delivery its answer: accepted (True), seen before, or the error."""
    for (_, _, future), result in zip(batch, results, strict=True):
        if future.done():  # its caller was cancelled
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(bool(result))


class _Shard:
    """One inbox stream's writer state: its keys, its held connection, and the deliveries
    waiting for its next call."""

    def __init__(self, number: int, shards: int) -> None:
        self.stream = keys.webhook_stream(number, shards)
        self.seen_prefix = keys.seen_prefix(number, shards)
        self.conn: Redis | None = None
        self.accept: AsyncScript | None = None
        self.waiting: list[tuple[str, list[Any], asyncio.Future[Any]]] = []
        self.sender: asyncio.Task[None] | None = None
        self.connecting = asyncio.Lock()  # app events share shard 0 with its group commit


class EventWriter:
    """The webhook path's writes. Inbox deliveries are group-committed: per inbox shard, one
    `ACCEPT_WEBHOOKS` call at a time, on a connection of its own, carries every delivery that
    arrived while the previous call was out (a burst's deliveries share a round trip and a
    script run; a lone one goes at once). Per delivery, the web process pays a list append and
    an awaited future, not a Redis command. Each delivery still gets its own answer: a Redis
    error fails exactly the deliveries of that call (they answer 503; Salla re-sends, and the
    "seen" mark makes any that did land a duplicate, not a loss). App events (few) are written
    one call each (`accept_app_event`), with the same script, on shard 0's connection.

    `shards` (`INBOX_SHARDS`): a store's deliveries go to stream `merchant mod shards`; on a
    cluster each shard's connection is to the master of its slot, so the shards' writes spread
    over the masters.

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
        shards: int = 1,
    ) -> None:
        self.pool = pool
        self.seen_ttl_s = seen_ttl_s
        self.retention_days = retention_days
        self.durability = durability
        self._replicas = REPLICAS_TO_WAIT_FOR[durability]
        self._wait_ms = max(1, round(durability_timeout_s * 1000))
        # Per shard, a connection held for the writer: no pool checkout (and its liveness
        # probe) per call, and the connection `WAITAOF` asks about is the one that wrote.
        self._shards = [_Shard(n, shards) for n in range(shards)]

    def accept(
        self, *, merchant: int, event: str, delivery: str, body: bytes, trace_id: str
    ) -> asyncio.Future[Any]:
        """Persist one delivery in the inbox; the future's result is False when it was accepted
        before, true otherwise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        header = orjson.dumps([str(merchant), event, delivery, trace_id])
        kept = body_codec.encode(body)  # compressed for the replay log (service/body_codec.py)
        shard = self._shards[merchant % len(self._shards)]  # keys.inbox_shard, inlined
        shard.waiting.append((shard.seen_prefix + delivery, [header, kept], future))
        if shard.sender is None:  # its first step runs after this loop turn's other requests
            shard.sender = loop.create_task(self._send_waiting(shard))
        return future

    async def _send_waiting(self, shard: _Shard) -> None:
        try:
            while shard.waiting:
                batch = shard.waiting[:ACCEPT_BATCH]
                del shard.waiting[:ACCEPT_BATCH]
                await self._send(shard, batch)
        finally:
            shard.sender = None
            # Stopped (the process is shutting down): nobody will send these; say so.
            for _, _, future in shard.waiting:
                if not future.done():
                    future.set_exception(RedisConnectionError("the event writer stopped"))
            shard.waiting.clear()

    async def _send(
        self, shard: _Shard, batch: list[tuple[str, list[Any], asyncio.Future[Any]]]
    ) -> None:
        names: list[Any] = [shard.stream]
        args: list[Any] = [self.seen_ttl_s, self._minid(), INBOX_GROUP]
        for seen_key, fields, _ in batch:
            names.append(seen_key)
            args += fields
        try:
            results: list[Any] = await self._call(shard, names, args)
        except Exception as exc:  # nothing of this call is known to be persisted: all fail
            results = [exc] * len(batch)
        except BaseException:  # cancelled: the process is stopping
            _settle(batch, [RedisConnectionError("the event writer stopped")] * len(batch))
            raise
        _settle(batch, results)

    async def _call(self, shard: _Shard, names: list[Any], args: list[Any]) -> list[Any]:
        """One `ACCEPT_WEBHOOKS` call on the shard's connection, then the durability wait.

        Once more on a new connection when the held one went stale (Redis restarted since the
        last call) or its server no longer holds the slot (a cluster's failover): safe even if
        the first call ran, since "seen" marks make a delivery that landed answer as a
        duplicate, never land twice, and the second call writes its marks again, so the wait
        covers the first call's writes too (on the same server)."""
        for attempt in (1, 2):
            try:
                async with shard.connecting:
                    if shard.conn is None or shard.accept is None:
                        shard.conn = await state_store.held_connection(
                            self.pool, shard.stream, wait_s=self._wait_ms / 1000
                        )
                        shard.accept = shard.conn.register_script(ACCEPT_WEBHOOKS)  # EVALSHA
                    conn, accept = shard.conn, shard.accept
                results: list[Any] = await accept(keys=names, args=args)
                await self._wait_durable(conn)
                return results
            except (RedisConnectionError, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not state_store.moved(exc):
                    raise
                # The server is gone, restarted, or no longer holds the slot (a failover):
                # connect again, to wherever the cluster now says the slot is. Also after the
                # second failure, so the next call looks again (a replica is promoted seconds
                # after its master died; until then the slot's webhooks answer 503).
                async with shard.connecting:
                    if shard.conn is conn:
                        await self._drop(shard)
                with contextlib.suppress(RedisError):
                    await state_store.refresh(self.pool)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _drop(self, shard: _Shard) -> None:
        conn, shard.conn, shard.accept = shard.conn, None, None
        if conn is not None:
            await conn.aclose(close_connection_pool=True)

    async def _wait_durable(self, conn: Redis) -> None:
        """Return once every write this connection made is in Redis's AOF on disk (and in a
        replica's, for `replica`); raise `NotDurable` if that takes longer than the timeout.
        `WAITAOF` counts the writes of the connection it is sent on, up to its last one."""
        if self._replicas is None:  # buffered: Redis fsyncs its AOF each second on its own
            return
        local, replicas = await conn.waitaof(1, self._replicas, self._wait_ms)
        if local < 1 or replicas < self._replicas:
            where = "on disk" if self._replicas == 0 else f"on disk and on {self._replicas} replica"
            raise NotDurable(
                f"Redis did not confirm the write {where} within {self._wait_ms} ms"
                f" (WAITAOF: local {local}, replicas {replicas})"
            )

    async def aclose(self) -> None:
        """Close the writer's connections."""
        for shard in self._shards:
            await self._drop(shard)

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
        connection (shard 0's), so the same `WAITAOF` covers it (a call of the group commit may run
        between the two: the wait then covers that call's writes too, which is harmless).
        """
        header = orjson.dumps([str(merchant), event, delivery, trace_id])
        names: list[Any] = [APP_EVENTS_STREAM, keys.seen(delivery)]  # shard 0's slot
        args: list[Any] = [self.seen_ttl_s, "", INBOX_GROUP, header, body]
        results = await self._call(self._shards[0], names, args)
        return bool(results[0])
