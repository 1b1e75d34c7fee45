"""Start-up checks: a busy port or an unreachable Redis is a `ConfigError` (one sentence and a
hint, exit 2) before anything starts, instead of a traceback or a minute of retries later."""

from __future__ import annotations

import socket

from service.errors import ConfigError

#: How long start-up waits for Redis to answer before calling it unreachable.
REDIS_CHECK_TIMEOUT_S = 3.0


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


def redis_reachable(url: str, timeout_s: float = REDIS_CHECK_TIMEOUT_S) -> str:
    """The URL, checked (`service.redis_url.check`), once its Redis answers a PING within a
    short timeout; the password never appears in the refusal."""
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
    except (RedisError, OSError) as exc:
        raise ConfigError(
            f"cannot reach Redis at {urls.redact(url)}: {_reason(exc)}",
            hint="start it, fix REDIS_URL, or unset REDIS_URL to use the embedded Redis",
        ) from None
    finally:
        client.close()
    return url


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__
