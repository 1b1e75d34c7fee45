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
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from service import redis_url

#: What a cluster answers while a failover or a resharding is under way (no master serves a
#: slot yet: CLUSTERDOWN; a slot half moved: TRYAGAIN), once redis-py's own retries are spent:
#: transient, like a lost connection; the caller tries again after a pause.
FAILING_OVER = (ClusterDownError, TryAgainError)


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


async def held_connection(client: Redis, key: str, *, wait_s: float) -> Redis:
    """A client on one connection of its own, to the server that holds `key` (the cluster's
    master of its slot, or the one Redis), that never sends a command again by itself.

    For the commands whose meaning depends on the connection they are sent on: `WAITAOF` and
    `WAIT` count the writes of their own connection, up to its last one. Sent again on a new
    connection after a timeout (redis-py does when a URL says `retry_on_timeout`), or routed
    by a cluster client to any connection of the node, they would confirm at once what was
    never confirmed. A failed command fails its call; the next call connects again (after a
    failover, call this again: `refresh` first learns the cluster's new masters).

    `wait_s`: the longest the server may take to answer (its `WAITAOF` or `WAIT` timeout); a
    socket timeout a few seconds past it (unless the URL sets one) ends a call to a server
    whose machine vanished without closing the connection, instead of waiting for TCP to give
    up after minutes."""
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
    if options.get("socket_timeout") is None:
        options["socket_timeout"] = wait_s + HELD_TIMEOUT_MARGIN_S
    one = ConnectionPool(connection_class=connection_class, max_connections=1, **options)
    return Redis(connection_pool=one, single_connection_client=True)


#: How much longer than its server-side wait a held connection's call may take (a busy server,
#: a network round trip) before its socket gives up.
HELD_TIMEOUT_MARGIN_S = 5.0


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


class NotReplicated(RedisConnectionError):
    """No replica confirmed a transition within the timeout: the action it guards (the call to
    Salla, or the next step after it) does not proceed, as if the connection had failed (the
    job is retried; the sweep recovers what it left `sending`)."""


class ReplicaWait:
    """`WAIT 1` after the grant transitions that guard an action, on a cluster: replication is
    asynchronous, and a failover that lost `sending` would let another worker send the same
    grants again; one that lost `sent` would have the reconciliation ask Salla about a call
    that is settled. Nothing on a single Redis (its replicas, if any, are not failed over to
    by the service's clients).

    `WAIT` counts the writes of its own connection, and the transition went out on whichever
    connection the cluster client picked: so a held connection to the slot's master writes a
    small mark in the same slot (`keys.replica_mark`), which the master orders after the
    transition, and waits for that. One held connection per master (its commands take turns:
    a wait is a replication round trip, about a millisecond)."""

    def __init__(self, client: Redis, timeout_s: float) -> None:
        self.client = client
        self.enabled = is_cluster(client)
        self._wait_ms = max(1, round(timeout_s * 1000))
        self._held: dict[str, Redis] = {}

    async def __call__(self, mark: str) -> None:
        """Return once a replica has every write its master holds for `mark`'s slot so far."""
        if not self.enabled:
            return
        for attempt in (1, 2):
            conn = await self._connection(mark)
            node = self._node(mark)
            try:
                await conn.set(mark, "1", px=60_000)
                acked = int(await conn.wait(1, self._wait_ms))
            except (RedisConnectionError, ResponseError) as exc:
                await self._forget(mark)
                if isinstance(exc, ResponseError) and not moved(exc):
                    raise
                await refresh(self.client)
                # Once more only on the same master (a connection gone stale while idle): on
                # a new one the mark would confirm the new master's copy, which may lack the
                # transition the old one held (a failover): the caller stops instead.
                if attempt == 2 or self._node(mark) != node:
                    raise NotReplicated(f"the slot's master changed or failed: {exc}") from exc
                continue
            if acked < 1:
                raise NotReplicated(f"no replica confirmed the write within {self._wait_ms} ms")
            return

    async def _connection(self, mark: str) -> Redis:
        await cast(RedisCluster, self.client).initialize()  # the slot table, once learnt
        node = self._node(mark)
        conn = self._held.get(node)
        if conn is None:
            conn = self._held[node] = await held_connection(
                self.client, mark, wait_s=self._wait_ms / 1000
            )
        return conn

    def _node(self, mark: str) -> str:
        cluster = cast(RedisCluster, self.client)
        node = cluster.get_node_from_key(mark)
        return node.name if node is not None else ""

    async def _forget(self, mark: str) -> None:
        conn = self._held.pop(self._node(mark), None)
        if conn is not None:
            await conn.aclose(close_connection_pool=True)

    async def aclose(self) -> None:
        for conn in self._held.values():
            await conn.aclose(close_connection_pool=True)
        self._held.clear()
