"""The state store's clients (`REDIS_URL`): one Redis, or a Redis Cluster (`REDIS_CLUSTER`).

Every command the service sends to the state store is valid on a cluster: each script's keys
share one slot (a store's keys carry its hash tag, the inbox shard's keys theirs; see
service/keys.py), no transaction or multi-key command spans slots. So one code path serves
both: callers hold a client typed `Redis` either way. redis-py's `RedisCluster` has the same
command methods (both are built from redis-py's command mixins) and routes each command, and
each script by its first key, to the master of its slot; what it lacks (transactions, and
pipelines whose commands must share a connection) the service does not ask of it, except
through `held_connection`.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from service import redis_url


def text_client(url: str, *, cluster: bool = False) -> Redis:
    """Replies as `str` (UTF-8): the ledger, tokens, settings, admin."""
    if cluster:
        return cast(Redis, RedisCluster.from_url(url, decode_responses=True))
    return redis_url.text_client(url)


def bytes_client(url: str, *, cluster: bool = False) -> Redis:
    """Replies as `bytes`: webhook bodies, signed byte for byte, stay bytes."""
    if cluster:
        return cast(Redis, RedisCluster.from_url(url))
    return redis_url.bytes_client(url)


def is_cluster(client: Redis) -> bool:
    return isinstance(client, RedisCluster)


async def held_connection(client: Redis, key: str) -> Redis:
    """A client on one connection of its own, to the server that holds `key` (the cluster's
    master of its slot, or the one Redis), that never sends a command again by itself.

    For the commands whose meaning depends on the connection they are sent on: `WAITAOF` and
    `WAIT` count the writes of their own connection, up to its last one. Sent again on a new
    connection after a timeout (redis-py does when a URL says `retry_on_timeout`), or routed
    by a cluster client to any connection of the node, they would confirm at once what was
    never confirmed. A failed command fails its call; the next call connects again (after a
    failover, call this again: `refresh` first learns the cluster's new masters)."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        node = client.get_node_from_key(key)
        if node is None:  # the cluster does not cover the slot (yet): like a lost connection
            raise ResponseError(f"CLUSTERDOWN no master serves the slot of {key!r}")
        source: dict[str, Any] = dict(node.connection_kwargs)
        connection_class = node.connection_class
    else:
        source = dict(client.connection_pool.connection_kwargs)
        connection_class = client.connection_pool.connection_class
    options = {**source, "retry": Retry(NoBackoff(), 0), "retry_on_timeout": False}
    options["retry_on_error"] = []
    one = ConnectionPool(connection_class=connection_class, max_connections=1, **options)
    return Redis(connection_pool=one, single_connection_client=True)


async def refresh(client: Redis) -> None:
    """Learn the cluster's masters again (after a failover moved a slot); nothing for one
    Redis."""
    if isinstance(client, RedisCluster):
        await client.nodes_manager.initialize()


def moved(exc: BaseException) -> bool:
    """Whether a plain client's error says its server no longer holds the slot (a failover or
    a resharding): ask the cluster where it is, and try there."""
    text = str(exc)
    return isinstance(exc, ResponseError) and text.startswith(
        ("MOVED", "ASK", "CLUSTERDOWN", "READONLY", "TRYAGAIN")
    )
