"""Automatic pipelining: commands that concurrent tasks issue in the same event-loop turn go to
Redis together, in one pipeline (what ioredis calls auto-pipelining; redis-py has none).

A worker processes a batch of webhooks concurrently; each one reads its ledger entry and then
commits. Sent one by one, every command pays a connection checkout, a socket write and a read;
coalesced, a batch of 100 reads costs one of each. Each caller still gets its own reply, or
its own exception.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from service import process_state


class AutoPipeline:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        #: Each command with who awaits it: one future, or several for a merged command.
        self._waiting: list[tuple[Any, asyncio.Future[Any] | list[asyncio.Future[Any]]]] = []
        #: Variadic commands being merged this turn: (command, key) -> the shared arguments.
        self._merging: dict[tuple[str, str], tuple[list[Any], list[asyncio.Future[Any]]]] = {}
        self._scheduled = False

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (as `execute_command` takes it); await the returned future."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((args, future))
        self._schedule()
        return future

    def merged(self, command: str, key: str, *args: Any) -> asyncio.Future[Any]:
        """Queue a variadic command (`ZADD key score member ...`, `SADD key member ...`) whose
        arguments join those of the same command on the same key queued this turn: one command
        for all of them, sent where the first of them was queued, so before anything queued
        after any of them. Each caller gets its own future (a cancelled caller cancels only
        its own) with the one command's outcome."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting = self._merging.get((command, key))
        if waiting is not None:
            waiting[0].extend(args)
            waiting[1].append(future)
            return future
        shared, futures = [command, key, *args], [future]
        self._merging[(command, key)] = (shared, futures)
        self._waiting.append((shared, futures))
        self._schedule()
        return future

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_waiting)

    def _send_waiting(self) -> None:
        self._scheduled = False
        batch, self._waiting = self._waiting, []
        self._merging = {}
        asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(
        self, batch: list[tuple[Any, asyncio.Future[Any] | list[asyncio.Future[Any]]]]
    ) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.execute_command(*args)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every command of the batch failed
            results = [exc] * len(batch)
        for (_, waiters), result in zip(batch, results, strict=True):
            if isinstance(waiters, list):
                for future in waiters:
                    _settle(future, result)
            else:
                _settle(waiters, result)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
        # Marked retrieved: a caller that awaits it still gets it raised, but callers await
        # their queued commands in turn (`[await f for f in queued]`), so when a connection
        # fails the batch, the first failure raises and the rest are never awaited; asyncio
        # would log each one as an error with its traceback ("Future exception was never
        # retrieved") for what the caller already reported once.
        future.exception()
    else:
        future.set_result(result)


def auto(redis: Redis) -> AutoPipeline:
    """The auto-pipeline of a client (one per client, made on first use)."""
    pipe: AutoPipeline | None = process_state.auto_pipes.get(redis)
    if pipe is None:
        pipe = process_state.auto_pipes[redis] = AutoPipeline(redis)
    return pipe
