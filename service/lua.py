"""Lua scripts run by their SHA1 (`EVALSHA`): the body goes to a server only when it lacks it.

redis-py's own `Script` (`register_script`) does the same, but is bound when made to one
client, from which it also takes its encoder; the service's scripts are module constants run
on whichever client a caller holds (the state store, standalone or `RedisCluster`, a CLI's, a
test's), so this keeps the body and its SHA1 and takes the client per call.

Every script starts `#!lua`: a Redis Cluster node then refuses it a key of another slot even
when the node serves both (service/keys.py), so a script that would break on a cluster breaks
on one node too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class Script:
    """One Lua script; `await script.run(redis, keys, *args)` is `EVAL body len(keys) ...`."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        if not body.startswith("#!lua"):
            raise ValueError("a script starts with #!lua (see the module's docstring)")
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()  # noqa: S324 - Redis's script id

    async def run(self, redis: Redis, keys: Sequence[str], *args: str) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:  # a server that never ran it, restarted, or a new master
            return await redis.eval(self.body, len(keys), *keys, *args)  # type: ignore[misc]
