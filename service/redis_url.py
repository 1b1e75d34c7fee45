"""`REDIS_URL`: read once, the same way for every client of the service.

redis-py's clients (`Redis.from_url`) and arq's pool (`RedisSettings`) are configured from the
one URL, parsed by redis-py's own parser, so a password or a TLS option cannot work for one and
be dropped by the other (arq's `RedisSettings.from_dsn` ignores every query parameter but `db`,
and does not percent-decode the password).

    redis://:PASSWORD@host:6379/0
    rediss://:PASSWORD@host:6380/0?ssl_ca_certs=/etc/ssl/redis-ca.pem

`rediss://` verifies the server's certificate against the system's CAs, or those in
`ssl_ca_certs` (a PEM file), and checks its name against the host: `ssl_check_hostname`
defaults to true here (redis-py 5 and arq default to false; redis-py 6 made it true); set
`ssl_check_hostname=false` only for a server whose certificate cannot name it. A client
certificate: `ssl_certfile` and `ssl_keyfile`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from service.errors import ConfigError

#: Query parameters both redis-py and arq's pool honour (the rest would reach one of them only).
SUPPORTED_QUERY = frozenset(
    {
        "db",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "socket_connect_timeout",
        "retry_on_timeout",
        "max_connections",
    }
)
_TLS_ONLY = frozenset(name for name in SUPPORTED_QUERY if name.startswith("ssl_"))


def check(url: str) -> str:
    """The URL the service connects with: validated (otherwise a ConfigError saying what is
    wrong, for the caller to prefix with where the URL came from), with
    `ssl_check_hostname=true` added to a `rediss://` URL that does not choose."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"must start with redis://, rediss:// (TLS) or unix://, not {redact(url)!r}"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = {name for name, _ in query}
    unknown = sorted(names - SUPPORTED_QUERY)
    if unknown:
        raise ConfigError(
            f"unsupported parameter {', '.join(unknown)} "
            f"(supported: {', '.join(sorted(SUPPORTED_QUERY))})"
        )
    if parts.scheme != "rediss" and names & _TLS_ONLY:
        raise ConfigError(f"{', '.join(sorted(names & _TLS_ONLY))}: only for a rediss:// (TLS) URL")
    try:
        parse_url(url)  # the port and the typed parameters (db, booleans, numbers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if parts.scheme == "rediss" and "ssl_check_hostname" not in names:
        query.append(("ssl_check_hostname", "true"))
        url = urlunsplit(parts._replace(query=urlencode(query)))
    return url


def password(url: str) -> str:
    """The URL's password ("" without one), percent-decoded as redis-py sends it."""
    return str(parse_url(url).get("password") or "")


def redact(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def arq_settings(url: str) -> RedisSettings:
    """arq's `RedisSettings` for the URL, from redis-py's parse of it."""
    options: dict[str, Any] = dict(parse_url(url))
    connection_class = options.pop("connection_class", None)
    settings = RedisSettings(
        host=options.pop("host", "localhost"),
        port=int(options.pop("port", 6379)),
        unix_socket_path=options.pop("path", None),
        database=int(options.pop("db", 0)),
        username=options.pop("username", None),
        password=options.pop("password", None),
        ssl=connection_class is SSLConnection,
    )
    if connection_class is UnixDomainSocketConnection:
        settings.host = "localhost"
    for name in ("ssl_ca_certs", "ssl_ca_data", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
        if name in options:
            setattr(settings, name, options.pop(name))
    if "ssl_check_hostname" in options:
        settings.ssl_check_hostname = bool(options.pop("ssl_check_hostname"))
    if "socket_connect_timeout" in options:
        settings.conn_timeout = options.pop("socket_connect_timeout")
    if "retry_on_timeout" in options:
        settings.retry_on_timeout = bool(options.pop("retry_on_timeout"))
    if "max_connections" in options:
        settings.max_connections = int(options.pop("max_connections"))
    return settings


def text_client(url: str) -> Redis:
    """A client whose replies are `str` (UTF-8): the ledger, tokens, settings, admin."""
    client: Redis = Redis.from_url(url, decode_responses=True)
    return client


def bytes_client(url: str) -> Redis:
    """A client whose replies are `bytes`: webhook bodies, signed byte for byte, stay bytes."""
    client: Redis = Redis.from_url(url)
    return client


def sentinel_hosts(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (`QUEUE_REDIS_SENTINELS`) as pairs; "" is none. `[::1]:26379`
    for an IPv6 address. A malformed item is a ConfigError naming it."""
    hosts: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if (
            not sep
            or not host
            or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536
        ):
            raise ConfigError(
                f"{item[:80]!r} is not host:port (for example sentinel-1:26379,sentinel-2:26379)"
            )
        hosts.append((host, int(port)))
    if text.strip() and not hosts:
        raise ConfigError("lists no Sentinel (for example sentinel-1:26379,sentinel-2:26379)")
    return hosts
