"""The inbox on a real Redis: a batch read, processed and acknowledged; a dead worker's entries
claimed by another; an entry that always fails given up after its tries, and kept for replay.
And the auto-pipeline the worker's concurrent events share."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service import autopipe, body_codec, inbox, ingest, keys, queue
from service.batch import BatchHandler
from service.keys import WEBHOOK_STREAM
from service.logging import captured, configure_logging
from service.processing import ProcessingDeps
from service.rules import parse_rules_text
from service.webhooks import delivery_id, read_head
from tests.conftest import eventually, make_settings

M = 4242
RULES = """
version: 1
rules:
  - id: purchase
    on: order.updated
    when: order.status == "completed"
    points: order.total // 10
    type: plus
    reason: "Order {order.id}"
"""


def order(n: int) -> bytes:
    return json.dumps(
        {
            "event": "order.updated",
            "merchant": M,
            "created_at": "",
            "data": {
                "id": n,
                "reference_id": n,
                "status": {"slug": "completed"},
                "amounts": {"total": {"amount": 100}},
                "customer": {"id": 700 + n},
            },
        }
    ).encode()


@pytest.fixture
async def binary(redis: Redis, redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await ingest.ensure_group(client)
    yield client
    await client.aclose()


@pytest.fixture
async def deps(redis: Redis, redis_url: str) -> AsyncIterator[ProcessingDeps]:
    configure_logging("json", "INFO")
    pool = await queue.connect(redis_url)
    yield ProcessingDeps(make_settings(), redis, pool, parse_rules_text(RULES, "t.yaml"))
    await pool.aclose()


async def accept(deps: ProcessingDeps, body: bytes) -> bool:
    """Persist a webhook exactly as the web process does."""
    env = read_head(body)
    delivery = delivery_id(env.merchant, env.event, body)
    writer = ingest.EventWriter(deps.pool, seen_ttl_s=60, retention_days=7)
    try:
        return await writer.accept(
            merchant=env.merchant,
            event=env.event,
            delivery=delivery,
            body=body,
            trace_id="t",
        )
    finally:
        await writer.aclose()


@contextlib.asynccontextmanager
async def running(reader: inbox.Inbox) -> AsyncIterator[None]:
    task = asyncio.create_task(reader.run())
    try:
        yield
    except BaseException:
        if task.done() and task.exception():  # say why the reader stopped, not only what failed
            raise task.exception() from None  # type: ignore[misc]
        raise
    finally:
        reader.stop()
        await asyncio.wait_for(task, 10)


async def pending_grants(redis: Redis) -> int:
    return int(await redis.zcard(keys.grant_set("pending", M)))


class TestInbox:
    async def test_a_batch_is_processed_and_acknowledged(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        for n in range(1, 251):
            assert await accept(deps, order(n))
        assert (await inbox.backlog(binary)).unread == 250
        async with running(inbox.Inbox(binary, BatchHandler(deps), batch=100)):
            await eventually(lambda: _empty(binary), timeout_s=20)
        assert await pending_grants(redis) == 250
        assert await redis.xlen(WEBHOOK_STREAM) == 250  # kept for replay

    async def test_a_dead_workers_entries_are_claimed_and_processed_once(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        for n in range(1, 4):
            assert await accept(deps, order(n))
        # A worker reads them and dies before acknowledging.
        await binary.xreadgroup(inbox.GROUP, "dead-worker", {WEBHOOK_STREAM: ">"}, count=10)
        assert (await inbox.backlog(binary)).pending == 3
        async with running(inbox.Inbox(binary, BatchHandler(deps), claim_idle_s=0.3)):
            await eventually(lambda: _empty(binary), timeout_s=10)
            assert await pending_grants(redis) == 3
            # The same events again (a second claim, a re-read) would change nothing.
            assert not await accept(deps, order(1))  # refused: already seen
        assert await pending_grants(redis) == 3
        pending = await binary.xpending(WEBHOOK_STREAM, inbox.GROUP)
        assert pending["pending"] == 0

    async def test_own_unacknowledged_entries_are_read_again_at_start(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        """A worker that restarts under its name (or lost Redis before its XACK) goes through
        what it had read, without waiting for the claim delay."""
        assert await accept(deps, order(1))
        await binary.xreadgroup(inbox.GROUP, "w1", {WEBHOOK_STREAM: ">"}, count=10)
        reader = inbox.Inbox(binary, BatchHandler(deps), consumer="w1", claim_idle_s=3600)
        async with running(reader):
            await eventually(lambda: _empty(binary), timeout_s=10)
        assert await pending_grants(redis) == 1

    async def test_an_entry_that_always_fails_is_given_up_and_kept(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        """Processing that raises (here: a corrupted ledger entry, as a bug would) does not
        block the others; after `max_tries` the entry is acknowledged with an error line and
        stays in the stream for `admin replay`."""
        # Its order's ledger entry is not a hash (corrupted by hand, say): every try fails.
        await redis.set(keys.entry(M, "order:77"), "corrupt")
        await binary.xadd(WEBHOOK_STREAM, {"merchant": M, "delivery": "bad", "body": order(77)})
        assert await accept(deps, order(1))
        reader = inbox.Inbox(binary, BatchHandler(deps), claim_idle_s=0.05, max_tries=3)
        with captured() as lines:
            async with running(reader):
                await eventually(lambda: _empty(binary), timeout_s=15)
        assert await pending_grants(redis) == 1
        stored = [f[b"delivery"] for _, f in await binary.xrange(WEBHOOK_STREAM)]
        assert b"bad" in stored
        failed = [x for x in lines if x["event"] == "event_failed"]
        (abandoned,) = [x for x in lines if x["event"] == "event_abandoned"]
        assert len(failed) == 3 and abandoned["tries"] == 3 and abandoned["delivery"] == "bad"

    async def test_a_body_the_rules_cannot_read_is_rejected_once_and_kept(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        """The edge reads only the envelope; a signed body it accepts that the worker cannot
        parse (a number beyond a double in `data`) is rejected at once: acknowledged with one
        error line, not tried again, kept in the stream."""
        unreadable = order(5).replace(b'"data": {', b'"data": {"weight": 1e400, ', 1)
        assert await accept(deps, unreadable)  # what the web process answers 200 to
        assert await accept(deps, order(6))
        reader = inbox.Inbox(binary, BatchHandler(deps), claim_idle_s=0.05, max_tries=3)
        with captured() as lines:
            async with running(reader):
                await eventually(lambda: _empty(binary), timeout_s=15)
        assert await pending_grants(redis) == 1  # order 6 only
        assert await redis.xlen(WEBHOOK_STREAM) == 2
        (rejected,) = [x for x in lines if x["event"] == "event_rejected"]
        assert "not valid JSON" in rejected["error"]
        assert not [x for x in lines if x["event"] in ("event_failed", "event_abandoned")]

    async def test_a_stream_written_anew_is_read_from_its_first_entry(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        """The stream vanishes (a flushed Redis) and the web writes it anew while a worker is
        starting: the stream is created with its group, so the entry cannot be skipped."""
        reader = inbox.Inbox(binary, BatchHandler(deps))
        async with running(reader):
            await binary.delete(WEBHOOK_STREAM)
            assert await accept(deps, order(9))  # the stream is new, with no group
            await eventually(lambda: pending_grants(redis), timeout_s=10)


async def _empty(binary: Redis) -> bool:
    return (await inbox.backlog(binary)).total == 0


async def test_entries_without_a_group_are_all_processed(
    redis: Redis, redis_url: str, deps: ProcessingDeps
) -> None:
    """A stream whose group is missing (a Redis restored from a copy taken before the group
    was made) holds webhooks nobody processed: the group starts at the stream's start."""
    binary = Redis.from_url(redis_url)
    await binary.xadd(WEBHOOK_STREAM, {"merchant": M, "delivery": "old", "body": order(1)})
    async with running(inbox.Inbox(binary, BatchHandler(deps))):
        assert await accept(deps, order(2))
        await eventually(lambda: _empty(binary), timeout_s=10)

        async def both() -> bool:
            return await pending_grants(redis) == 2

        await eventually(both, timeout_s=10)
    assert await pending_grants(redis) == 2
    assert await redis.exists(keys.entry(M, "order:1")) == 1
    await binary.aclose()


class TestAutoPipeline:
    async def test_concurrent_commands_share_a_pipeline_and_keep_their_own_answers(
        self, redis: Redis
    ) -> None:
        await redis.set("text", "x")
        pipe = autopipe.auto(redis)
        sent: list[int] = []
        original = pipe._send

        async def counting(batch: Any) -> None:
            sent.append(len(batch))
            await original(batch)

        pipe._send = counting  # type: ignore[method-assign]
        answers = await asyncio.gather(
            *(pipe.execute("INCR", f"n{i % 3}") for i in range(30)),
            pipe.execute("INCR", "text"),  # an error for this caller only
            return_exceptions=True,
        )
        assert sent == [31]  # one round trip
        assert sorted(a for a in answers[:30] if isinstance(a, int))[-3:] == [10, 10, 10]
        assert isinstance(answers[30], ResponseError)

    async def test_merged_commands_are_one_command_placed_before_what_follows(
        self, redis: Redis
    ) -> None:
        """Three callers' ZADDs to one key become one ZADD, sent where the first was queued:
        a command queued after any of them sees every member (the grant log is written before
        the commits it covers). A cancelled caller does not cancel the others."""
        pipe = autopipe.auto(redis)
        before = (await redis.info("commandstats")).get("cmdstat_zadd", {}).get("calls", 0)
        first = pipe.merged("ZADD", "log", 1, "a")
        count_between = pipe.execute("ZCARD", "log")
        second = pipe.merged("ZADD", "log", 2, "b", 3, "c")
        cancelled = pipe.merged("ZADD", "log", 4, "d")
        cancelled.cancel()
        count_after = pipe.execute("ZCARD", "log")
        assert await first == await second == 4  # one command added all four
        assert await count_between == await count_after == 4
        after = (await redis.info("commandstats"))["cmdstat_zadd"]["calls"]
        assert after - before == 1
        assert await redis.zrange("log", 0, -1) == ["a", "b", "c", "d"]

    async def test_a_lost_connection_fails_every_caller_of_the_batch(self, redis_url: str) -> None:
        client = Redis.from_url(redis_url.rsplit(":", 1)[0] + ":1")  # nothing listens there
        answers = await asyncio.gather(
            *(autopipe.auto(client).execute("GET", "k") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(a, RedisConnectionError) for a in answers)
        await client.aclose()

    async def test_a_caller_that_stops_at_its_first_failure_leaves_no_noise(
        self, redis_url: str
    ) -> None:
        """Callers await their commands in turn; when the batch failed, the first raises and
        the others are dropped unawaited: asyncio must not log each as an error."""
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        client = Redis.from_url(redis_url.rsplit(":", 1)[0] + ":1")  # nothing listens there
        try:
            queued = [autopipe.auto(client).execute("GET", f"k{n}") for n in range(3)]
            with pytest.raises(RedisConnectionError):
                _ = [await f for f in queued]
            await asyncio.sleep(0)
            del queued
            gc.collect()  # a dropped future reports its unretrieved exception when collected
        finally:
            loop.set_exception_handler(None)
            await client.aclose()
        assert reported == []


class TestEventWriter:
    """The web's group commit: deliveries that arrive together share one script call, and each
    still gets its own answer."""

    async def test_concurrent_deliveries_share_a_call_and_keep_their_own_answers(
        self, redis: Redis, binary: Redis, deps: ProcessingDeps
    ) -> None:
        writer = ingest.EventWriter(deps.pool, seen_ttl_s=60, retention_days=7)
        bodies = [order(n) for n in range(100, 150)] + [order(n) for n in range(100, 105)]
        await redis.script_load(ingest.ACCEPT_WEBHOOKS)  # else the first EVALSHA is a NOSCRIPT
        await redis.config_resetstat()
        try:
            answers = await asyncio.gather(
                *(
                    writer.accept(
                        merchant=M,
                        event="order.updated",
                        delivery=delivery_id(M, "order.updated", body),
                        body=body,
                        trace_id=f"t{n}",
                    )
                    for n, body in enumerate(bodies)
                )
            )
        finally:
            await writer.aclose()
        assert answers == [True] * 50 + [False] * 5  # the repeats are duplicates, in one call
        stats = await redis.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1  # one round trip for all 55
        entries = await binary.xrange(WEBHOOK_STREAM)
        assert len(entries) == 50
        first = entries[0][1]
        assert (first[b"merchant"], first[b"event"], first[b"trace_id"]) == (
            str(M).encode(),
            b"order.updated",
            b"t0",
        )
        assert body_codec.decode(first[b"body"]) == bodies[0]
        assert first[b"body"][:1] == body_codec.MARK  # kept compressed

    async def test_redis_unreachable_fails_every_delivery_of_the_call(self, redis_url: str) -> None:
        unreachable = ArqRedis.from_url(redis_url.rsplit(":", 1)[0] + ":1")  # nothing there
        writer = ingest.EventWriter(unreachable, seen_ttl_s=60, retention_days=7)
        try:
            answers = await asyncio.gather(
                *(
                    writer.accept(
                        merchant=M,
                        event="order.updated",
                        delivery=f"d{n}",
                        body=order(n),
                        trace_id="t",
                    )
                    for n in range(3)
                ),
                return_exceptions=True,
            )
        finally:
            await writer.aclose()
            await unreachable.aclose()
        assert all(isinstance(a, RedisConnectionError) for a in answers)
