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
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (as `execute_command` takes it); await the returned future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._send_waiting, loop)
        return future

    def _send_waiting(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        batch, self._waiting = self._waiting, []
        loop.create_task(self._send(batch))

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.execute_command(*args)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every command of the batch failed
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def auto(redis: Redis) -> AutoPipeline:
    """The auto-pipeline of a client (one per client, made on first use)."""
    pipe: AutoPipeline | None = process_state.auto_pipes.get(redis)
    if pipe is None:
        pipe = process_state.auto_pipes[redis] = AutoPipeline(redis)
    return pipe
