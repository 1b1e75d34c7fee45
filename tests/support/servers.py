"""Real servers for tests: uvicorn on a thread with a free loopback port."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


#: Below the range the kernel hands out to outgoing connections (ip_local_port_range).
_FIRST, _LAST = 20000, _ephemeral_start() - 1


def free_port() -> int:
    """A loopback port nothing listens on, outside the kernel's range for outgoing
    connections. A server's port inside that range (what `bind(0)` gives) can be taken while
    the server is down by any client's outgoing connection, or by the reconnecting client
    itself: TCP's simultaneous open connects a socket whose local port is the port it dials
    to itself, and it then reads its own commands back as replies. A restarted test Redis
    then answered a worker with garbage (a `TypeError` in arq's start-up, exit 1) once in
    hundreds of runs."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(_FIRST, _LAST)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port between {_FIRST} and {_LAST}")


@contextmanager
def serve_in_thread(app: Any, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve an ASGI app over real HTTP on 127.0.0.1 (`options`: uvicorn's); yields its URL."""
    port = port or free_port()
    options = {"log_level": "warning", "lifespan": "on", **options}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(check: Callable[[], Any], timeout_s: float = 30, interval_s: float = 0.05) -> None:
    """Poll a synchronous `check()` until it is truthy; connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            pass
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")
