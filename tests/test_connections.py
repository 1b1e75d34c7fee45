"""Idle and slow connections cannot starve `serve`: a real server process at the systemd
default of 1,024 open files, 1,000 connections that send nothing or dribble their headers."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from service.server import RESERVED_FILES
from service.webhooks import signed_headers
from tests.conftest import ROOT_DIR, SECRET, fixture_bytes
from tests.support.servers import free_port, wait_until

HELD = 1000
OPEN_FILES = 1024  # what systemd gives a unit that does not say LimitNOFILE=
HEADER_TIMEOUT_S = 20  # short for a test; long enough to send webhooks while all are held
HOLDS_AT_MOST = OPEN_FILES - RESERVED_FILES


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@pytest.fixture
def roomy_test_process() -> Iterator[None]:
    """This test process holds the 1,000 connections: its own limit must allow them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * HELD
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def is_open(sock: socket.socket) -> bool:
    """Still held: nothing to read (the server's answer or its EOF would be there to peek)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def read_to_eof(sock: socket.socket, timeout_s: float) -> bytes | None:
    """Everything the server sends until it closes; None if it has not closed by then."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    except OSError:  # reset: closed too
        pass
    return data


class Dribbler(threading.Thread):
    """Sends one more byte of a request's headers on each connection every half second."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for sock in self.socks:
                with contextlib.suppress(OSError):  # closed by the server
                    sock.send(b"x")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_idle_and_dribbling_connections_neither_block_webhooks_nor_stay_open(
    roomy_test_process: None, redis_url: str, tmp_path: Path
) -> None:
    Redis.from_url(redis_url).flushall()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ, "REDIS_URL": redis_url, "SALLA_WEBHOOK_SECRET": SECRET,
        "LOG_FORMAT": "json", "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }  # fmt: skip
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        web = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            cwd=ROOT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=_limit_open_files,
        )  # fmt: skip
    held: list[socket.socket] = []
    dribbler = None
    try:
        wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout_s=60)
        for n in range(HELD):
            sock = socket.create_connection(("127.0.0.1", port))
            if n % 2:  # half dribble: a request line, then a header byte now and then
                sock.sendall(b"POST /webhooks/salla HTTP/1.1\r\nX-Slow: ")
            held.append(sock)
        dribbler = Dribbler(held[1::2])
        dribbler.start()
        # All accepted: the server holds what its open files allow (1,024 less a reserve for
        # Redis and itself); each newcomer beyond that closed the longest-waiting connection.
        wait_until(lambda: sum(map(is_open, held)) == HOLDS_AT_MOST, timeout_s=30)

        body = fixture_bytes("order.status.updated.json")
        for n in range(5):
            doc = json.loads(body)
            doc["data"]["id"] = 9000 + n  # five distinct deliveries
            one = json.dumps(doc).encode()
            answer = httpx.post(
                f"{base}/webhooks/salla", content=one, headers=signed_headers(one, SECRET)
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "accepted"
        assert httpx.get(f"{base}/healthz").status_code == 200
        # Answered while the idle and dribbling connections were held (each request's
        # connection made room by closing one of them).
        assert sum(map(is_open, held)) >= HOLDS_AT_MOST - 10

        answers = [read_to_eof(sock, timeout_s=HEADER_TIMEOUT_S + 30) for sock in held]
        assert all(a is not None for a in answers), "a connection was never closed"
        idle, dribbling = answers[0::2], answers[1::2]
        assert all(a == b"" for a in idle)  # nothing was asked: closed without a word
        timed_out = [a for a in dribbling if a and a.startswith(b"HTTP/1.1 408 ")]
        evicted = [a for a in dribbling if a and a.startswith(b"HTTP/1.1 503 ")]
        assert len(timed_out) + len(evicted) == len(dribbling)
        assert len(timed_out) >= 400 and b"did not arrive within 20s" in timed_out[0]
        assert web.poll() is None
        assert httpx.get(f"{base}/healthz").status_code == 200
    finally:
        if dribbler is not None:
            dribbler.done.set()
        for sock in held:
            sock.close()
        web.terminate()
        web.wait(timeout=15)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    [limited] = [line for line in lines if line["event"] == "connections_limited"]
    assert limited["open_file_limit"] == OPEN_FILES
    assert limited["held_at_most"] == HOLDS_AT_MOST
    assert any(line["event"] == "connections_closed" for line in lines)
