"""The ledger's one write primitive: a set of writes that happens only if every value it
depends on is still what the caller read (optimistic concurrency in one round trip)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from service import autopipe

# KEYS: every key the commit reads or writes (one store's: one slot). ARGV[1]: JSON
# {"checks": [[key index, hash field or "", expected value or ""], ...],
# "writes": [[command, key index, arguments...], ...]}, a key index counting from 1 into KEYS.
# The writes happen only if every checked value is still what the caller read (a missing key
# reads as ""); else nothing is written and 0 is returned, and the caller reads again.
# Optimistic concurrency in one round trip, where WATCH/MULTI/EXEC took three; the rest in one
# JSON argument, because packing each argument of a command is a large share of the client's
# CPU per event.
_COMMIT = """#!lua
local commit = cjson.decode(ARGV[1])
for _, check in ipairs(commit.checks) do
  local have
  if check[2] == '' then
    have = redis.call('GET', KEYS[check[1]])
  else
    have = redis.call('HGET', KEYS[check[1]], check[2])
  end
  if (have or '') ~= check[3] then return 0 end
end
for _, write in ipairs(commit.writes) do
  redis.call(write[1], KEYS[write[2]], unpack(write, 3))
end
return 1
"""


class Writes:
    """The writes of one commit, in `_COMMIT`'s argument form. `check` records a value the
    writes depend on. Every key must be of one store (one slot): a Redis Cluster refuses the
    commit otherwise, and so does a single Redis in cluster mode (the tests run one)."""

    def __init__(self) -> None:
        #: Each key's index in KEYS (from 1), in the order first named.
        self.keys: dict[str, int] = {}
        self.checks: list[tuple[int, str, str]] = []
        self.writes: list[list[str | int]] = []

    def _key(self, key: str) -> int:
        return self.keys.setdefault(key, len(self.keys) + 1)

    def check(self, key: str, field: str, expected: str | None) -> None:
        self.checks.append((self._key(key), field, expected or ""))

    def _op(self, command: str, key: str, *args: object) -> None:
        self.writes.append([command, self._key(key), *map(str, args)])

    def hset(self, key: str, field: str = "", value: object = "", *, mapping: Any = None) -> None:
        pairs = [field, value] if field else []
        for name, item in (mapping or {}).items():
            pairs += [name, item]
        self._op("HSET", key, *pairs)

    def set(self, key: str, value: str, *, ex: int | None = None) -> None:
        self._op("SET", key, value, *(("EX", ex) if ex is not None else ()))

    def expire(self, key: str, seconds: int) -> None:
        self._op("EXPIRE", key, seconds)

    def zadd(self, key: str, members: dict[str, int]) -> None:
        self._op("ZADD", key, *(x for member, score in members.items() for x in (score, member)))

    def zrem(self, key: str, member: str) -> None:
        self._op("ZREM", key, member)

    def zremrangebyscore(self, key: str, low: str, high: int) -> None:
        self._op("ZREMRANGEBYSCORE", key, low, high)

    def incrby(self, key: str, amount: int) -> None:
        self._op("INCRBY", key, amount)

    def sadd(self, key: str, member: str) -> None:
        self._op("SADD", key, member)

    def delete(self, key: str) -> None:
        self._op("DEL", key)

    def hdel(self, key: str, field: str) -> None:
        self._op("HDEL", key, field)

    def hsetnx(self, key: str, field: str, value: str) -> None:
        self._op("HSETNX", key, field, value)

    def setnx(self, key: str, value: str) -> None:
        self._op("SET", key, value, "NX")

    def encoded(self) -> bytes:
        return orjson.dumps({"checks": self.checks, "writes": self.writes})


#: Sent by its SHA1 (EVALSHA): redis-py copies a command's packed bytes once per argument, so
#: the body (half a kilobyte) would be copied once per key in KEYS on every commit.
_COMMIT_SHA = hashlib.sha1(_COMMIT.encode()).hexdigest()  # noqa: S324 - Redis's script id


def queue_commit(redis: Redis, writes: Writes) -> Coroutine[Any, Any, int]:
    """Queue the commit on the client's auto-pipeline now, behind whatever this turn queued
    before it (a cross-store listing that must precede it); await the result for its reply
    (1 if written)."""
    names = list(writes.keys)
    queued = autopipe.auto(redis).execute(
        "EVALSHA", _COMMIT_SHA, len(names), *names, writes.encoded()
    )
    return _reply(redis, names, writes, queued)


async def _reply(
    redis: Redis, names: list[str], writes: Writes, queued: asyncio.Future[Any]
) -> int:
    try:
        return int(await queued)
    except NoScriptError:  # a server that never saw it, restarted or failed over: load, again
        await redis.script_load(_COMMIT)
        encoded = writes.encoded().decode()
        reply = await redis.evalsha(_COMMIT_SHA, len(names), *names, encoded)  # type: ignore[misc]
        return int(reply)


async def commit(redis: Redis, writes: Writes) -> bool:
    """Run the writes if their checks hold (True), in one round trip."""
    return bool(await queue_commit(redis, writes))
