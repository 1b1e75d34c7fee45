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
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.server import RESERVED_FILES, SERVER_OPTIONS, HeaderDeadlines, protocol_class
from service.webhooks import signed_headers
from tests.conftest import ROOT_DIR, SECRET, fixture_bytes
from tests.support.servers import free_port, serve_in_thread, wait_until

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


async def _hello(request: object) -> PlainTextResponse:
    return PlainTextResponse("hello")


HELLO = Starlette(routes=[Route("/", _hello)])
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture(params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def guarded_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, HeaderDeadlines]]:
    """uvicorn with either HTTP parser, a half-second header deadline, three connections."""
    deadlines = HeaderDeadlines(timeout_s=0.5, max_connections=3)
    port = free_port()
    options = {**SERVER_OPTIONS, "log_config": None}
    options.update(http=protocol_class(deadlines, request.param), limit_concurrency=4)
    with serve_in_thread(HELLO, port, **options):
        yield port, deadlines


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


class TestHeaderDeadline:
    """Both of uvicorn's parsers: headers must arrive in time, on every request of a
    connection; the connection count is bounded; answered requests are untouched."""

    def test_a_connection_that_sends_nothing_is_closed_without_a_word(
        self, guarded_server: tuple[int, HeaderDeadlines]
    ) -> None:
        port, _ = guarded_server
        with connect(port) as sock:
            assert read_to_eof(sock, timeout_s=10) == b""

    def test_headers_that_trickle_past_the_deadline_get_408(
        self, guarded_server: tuple[int, HeaderDeadlines]
    ) -> None:
        port, _ = guarded_server
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: te")
            answer = read_to_eof(sock, timeout_s=10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert answer.endswith(b'"error":"the request headers did not arrive within 0.5s"}')

    def test_each_request_of_a_kept_alive_connection_has_the_deadline(
        self, guarded_server: tuple[int, HeaderDeadlines]
    ) -> None:
        port, _ = guarded_server
        with connect(port) as sock:
            sock.sendall(REQUEST)
            first = sock.recv(4096)
            assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"hello")
            # uvicorn's keep-alive timer stops at the first byte: only the deadline ends this
            sock.sendall(b"GET / HTTP/1.1\r\n")
            answer = read_to_eof(sock, timeout_s=10)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 ")

    def test_requests_whose_headers_arrive_in_time_are_answered(
        self, guarded_server: tuple[int, HeaderDeadlines]
    ) -> None:
        port, _ = guarded_server
        with connect(port) as sock:
            for _ in range(3):  # kept alive, answered each time, pipelined at the end
                sock.sendall(REQUEST[:10])
                sock.sendall(REQUEST[10:])
                assert sock.recv(4096).endswith(b"hello")
            sock.sendall(REQUEST * 2)
            wait_until(lambda: sock.recv(4096, socket.MSG_PEEK).count(b"hello") == 2)

    def test_oversized_headers_get_431(self, guarded_server: tuple[int, HeaderDeadlines]) -> None:
        port, _ = guarded_server
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024))
            answer = read_to_eof(sock, timeout_s=10)
        assert answer is not None
        assert answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 "))  # h11 refuses first

    def test_beyond_the_bound_the_longest_waiting_makes_room(
        self, guarded_server: tuple[int, HeaderDeadlines]
    ) -> None:
        port, _ = guarded_server
        oldest, *others = [connect(port) for _ in range(3)]
        try:
            with connect(port) as newcomer:
                newcomer.sendall(REQUEST)
                assert newcomer.recv(4096).endswith(b"hello")
            assert read_to_eof(oldest, timeout_s=0.3) == b""  # closed at once, not at 0.5 s
        finally:
            for sock in [oldest, *others]:
                sock.close()


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
