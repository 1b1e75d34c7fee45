"""Start-up checks: a busy port, an unreachable Redis, or a Redis that cannot give the
`WEBHOOK_DURABILITY` asked for is a `ConfigError` (one sentence and a hint, exit 2) before
anything starts, instead of a traceback, a minute of retries, or every webhook answering 503."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from service.errors import ConfigError

if TYPE_CHECKING:
    from service.settings import Settings

#: How long start-up waits for Redis to answer before calling it unreachable.
REDIS_CHECK_TIMEOUT_S = 3.0
#: How long start-up waits for Redis to confirm a test write on disk (`durable_writes`; a
#: primary with `appendfsync everysec` does it at once for a waiting `WAITAOF`).
FSYNC_CHECK_TIMEOUT_S = 1.0
#: How long start-up waits for a connected replica to confirm its write on its disk.
REPLICA_CHECK_TIMEOUT_S = 2.0


def bind(host: str, port: int, option: str) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds its own (handed to it, so no other
    process can take the port between this check and the server's start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint=f"stop what listens there (ss -ltnp 'sport = :{port}') or choose another {option}",
        ) from None
    sock.set_inheritable(True)
    return sock


def port_free(host: str, port: int, option: str) -> None:
    """Refuse a port another process listens on (the child that will use it binds it later)."""
    bind(host, port, option).close()


def redis_reachable(
    url: str, timeout_s: float = REDIS_CHECK_TIMEOUT_S, *, cluster: bool | None = None
) -> str:
    """The URL, checked (`service.redis_url.check`), once its Redis answers a PING within a
    short timeout; the password never appears in the refusal. `cluster` (`REDIS_CLUSTER`, for
    the state store): the server must be a cluster's node, or must not be."""
    from redis import Redis
    from redis.exceptions import RedisError

    from service import redis_url as urls

    try:
        url = urls.check(url)
    except ConfigError as exc:
        raise ConfigError(
            f"REDIS_URL: {exc}", hint="redis://:PASSWORD@host:port/db, rediss:// for TLS"
        ) from None
    client = Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
        if cluster is not None:
            info: dict[str, Any] = client.info(section="cluster")  # type: ignore[assignment]
            enabled = str(info.get("cluster_enabled", 0)) == "1"
    except (RedisError, OSError) as exc:
        raise _unreachable(url, exc) from None
    finally:
        client.close()
    if cluster is not None and enabled != cluster:
        where = urls.redact(url)
        if cluster:
            raise ConfigError(
                f"REDIS_CLUSTER=true, but the Redis at {where} is not a cluster's node",
                hint="point REDIS_URL at a node of the cluster, or unset REDIS_CLUSTER",
            )
        raise ConfigError(
            f"the Redis at {where} is a Redis Cluster's node, and REDIS_CLUSTER is not set",
            hint="set REDIS_CLUSTER=true (and QUEUE_REDIS_URL to a standalone Redis for arq)",
        )
    return url


def durable_writes(
    url: str, durability: str, timeout_s: float = REDIS_CHECK_TIMEOUT_S, *, cluster: bool = False
) -> None:
    """Refuse `WEBHOOK_DURABILITY=fsync|replica` against a Redis that cannot confirm a write
    on disk: one without `WAITAOF` (before Redis 7.2 / Valkey 8.0), with `appendonly no`, or
    with `appendfsync no`.

    Asked of the server, not read from its version: `WAITAOF 1 0` on this fresh connection,
    which has written nothing, answers at once, or with the server's refusal: an unknown
    command (older servers, or renamed away), AOF off, a replica. (`COMMAND INFO` would say
    whether the command exists, but redis-py's parser of its answer fails on the nil an
    unknown command gets.) Then one write (the `DURABLE_MARK` key, the web's own) and the wait
    the web makes for it. `replica` does not need a replica connected at start-up: until
    one is, webhooks answer 503, and Salla sends them again.

    On a cluster (`cluster`), every master is asked both (each holds inbox shards): the write
    goes to a key of a slot it serves (`DURABLE_MARK`, or a `keys.durable_probe`).

    `replica` with a replica connected: the write is also waited for on a replica's disk; one
    that does not confirm (its AOF off, or still rewriting it after a full sync) gets a
    warning, not a refusal: the web answers 503 until one confirms, and Salla re-sends."""
    from redis import Redis
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisError

    from service import redis_url as urls
    from service.keys import DURABLE_MARK

    if durability == "buffered":
        return
    options = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    try:
        if not cluster:
            client = Redis.from_url(url, **options)
            try:
                _can_wait_for_disk(client, urls.redact(url), durability)
                _confirms_a_write(client, urls.redact(url), durability, DURABLE_MARK)
            finally:
                client.close()
            return
        nodes = RedisCluster.from_url(url, **options)
        try:
            for node in nodes.get_primaries():
                assert node.redis_connection is not None  # made by the client for each node
                _can_wait_for_disk(node.redis_connection, node.name, durability)
                _confirms_a_write(
                    node.redis_connection, node.name, durability, _key_on(nodes, node.name)
                )
        finally:
            nodes.close()
    except (RedisError, OSError) as exc:
        raise _unreachable(url, exc) from None


def _can_wait_for_disk(client: Any, where: str, durability: str) -> None:
    """Asked of the server, not read from its version (see `durable_writes`)."""
    from redis.exceptions import ResponseError

    try:
        client.waitaof(1, 0, 1)
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            raise ConfigError(
                f"WEBHOOK_DURABILITY={durability} needs WAITAOF, which the Redis at {where} "
                "does not have (Redis 7.2+ and Valkey 8+ have it)",
                hint="upgrade Redis, or set WEBHOOK_DURABILITY=buffered",
            ) from None
        if "appendonly" in str(exc):
            raise ConfigError(
                f"WEBHOOK_DURABILITY={durability} needs Redis's AOF, but the Redis at "
                f"{where} runs with appendonly no",
                hint="turn it on (appendonly yes in its configuration, or CONFIG SET "
                "appendonly yes), or set WEBHOOK_DURABILITY=buffered",
            ) from None
        raise ConfigError(
            f"WEBHOOK_DURABILITY={durability}: the Redis at {where} refuses WAITAOF "
            f"({_reason(exc)})",
            hint="point REDIS_URL at the primary, or set WEBHOOK_DURABILITY=buffered",
        ) from None


def _key_on(nodes: Any, name: str) -> str:
    """A key of a slot the cluster's master `name` serves: `DURABLE_MARK`, or a probe."""
    from service.keys import DURABLE_MARK, durable_probe

    for key in (DURABLE_MARK, *(durable_probe(n) for n in range(100_000))):
        if nodes.get_node_from_key(key).name == name:
            return key
    raise ConfigError(f"the cluster's master {name} serves no slot", hint="check the cluster")


def _confirms_a_write(client: Any, where: str, durability: str, key: str) -> None:
    """A write, then the wait the web will make: `appendfsync no` accepts WAITAOF and never
    confirms anything (every webhook would wait its timeout and answer 503). One client,
    used by one thread: its pool hands the write's connection to the wait."""
    from service.logging import get_logger

    client.set(key, "1", ex=3600)
    wait_ms = round(FSYNC_CHECK_TIMEOUT_S * 1000)
    confirmed: list[int] = client.waitaof(1, 0, wait_ms)
    if confirmed[0] < 1:
        raise ConfigError(
            f"WEBHOOK_DURABILITY={durability}: the Redis at {where} did not confirm a write "
            f"on disk within {FSYNC_CHECK_TIMEOUT_S:g}s (with appendfsync no it never does)",
            hint="set its appendfsync to everysec or always, or set WEBHOOK_DURABILITY=buffered",
        )
    if durability != "replica":
        return
    connected = int(client.info(section="replication").get("connected_slaves", 0))
    if connected and client.waitaof(1, 1, round(REPLICA_CHECK_TIMEOUT_S * 1000))[1] < 1:
        get_logger("service.preflight").warning(
            "durability_replica_unconfirmed",
            redis=where,
            replicas=connected,
            consequence="webhooks answer 503 until a replica confirms writes on its disk",
            hint="turn on appendonly on its replicas (a replica after a full sync confirms "
            "only once it rewrote its AOF)",
        )


def _unreachable(url: str, exc: BaseException) -> ConfigError:
    from service import redis_url as urls

    return ConfigError(
        f"cannot reach Redis at {urls.redact(url)}: {_reason(exc)}",
        hint="start it, fix REDIS_URL, or unset REDIS_URL to use the embedded Redis",
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__


def queue_reachable(
    settings: Settings, state_url: str, timeout_s: float = REDIS_CHECK_TIMEOUT_S
) -> None:
    """Refuse to start when the queue's own Redis (`QUEUE_REDIS_URL`, or the master the
    `QUEUE_REDIS_SENTINELS` name) does not answer; nothing to check when the queue shares the
    state store's Redis."""
    from redis import Redis
    from redis.exceptions import RedisError
    from redis.sentinel import MasterNotFoundError, Sentinel

    from service import queue
    from service import redis_url as urls

    where = queue.target(settings, state_url)
    if not where.sentinels:
        if settings.queue_redis_url:
            try:
                redis_reachable(where.url, timeout_s)
            except ConfigError as exc:
                raise ConfigError(
                    f"QUEUE_REDIS_URL: {exc.message}",
                    hint="start it, fix QUEUE_REDIS_URL, or unset it (the queue then shares "
                    "REDIS_URL)",
                ) from None
        return
    options = urls.arq_settings(where.url)
    # With timeouts, unlike arq's Sentinel mode: a start-up check must not hang.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        where.sentinels,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
        db=options.database,
        username=options.username,
        password=options.password,
    )
    try:
        host, port = sentinel.discover_master(where.master)  # type: ignore[no-untyped-call]
    except MasterNotFoundError:
        raise ConfigError(
            f"no Sentinel of {settings.queue_redis_sentinels} answers with a master named "
            f"{where.master!r}",
            hint="check QUEUE_REDIS_SENTINELS and QUEUE_REDIS_SENTINEL_MASTER "
            "(redis-cli -p 26379 SENTINEL masters lists the names)",
        ) from None
    master: Redis = sentinel.master_for(where.master)  # type: ignore[no-untyped-call]
    try:
        master.ping()
    except (RedisError, OSError) as exc:
        raise ConfigError(
            f"the queue's master {host}:{port} (named by the Sentinels) does not answer: "
            f"{_reason(exc)}",
            hint="check that it is up and the master's password in QUEUE_REDIS_URL",
        ) from None
    finally:
        master.close()
