"""The HTTP server of `serve`: uvicorn, with a header deadline and a bound on connections.

uvicorn never closes a connection that has not finished its request headers: its keep-alive
timer starts only after an answer, and any byte received cancels it. A thousand connections
that send nothing (or a header byte now and then) therefore hold a thousand open files for
ever; at the default limit of 1,024 the process can no longer accept a webhook, nor reach
Redis. Three things keep it serving:

* **A header deadline.** uvicorn's own HTTP protocol class (httptools', or h11's when httptools
  is missing: the one `--http auto` picks) is subclassed so that a connection must complete
  its request headers within `HEADER_TIMEOUT_S` of opening, and again of each answer on a
  kept-alive connection; otherwise it is closed (a `408` first if part of a request arrived).
  One timer serves every connection: all deadlines are "now + the same timeout", so the
  waiting connections, kept in arrival order, are also in deadline order.
* **A bound.** At most `MAX_CONNECTIONS` connections are held. One more evicts the connection
  that has waited longest for its headers; when every connection is busy with a request,
  uvicorn's `limit_concurrency` answers `503`.
* **Open files to match.** `serve` raises its soft open-file limit towards the hard one as
  far as `MAX_CONNECTIONS` needs (as Go's runtime does at start); when the hard limit is
  lower, it holds fewer connections and says so (`connections_limited`).

Why subclass rather than change server: uvicorn is what the benchmarks, the log bridging and
the deployment are built on, and the protocol class is a documented extension point
(`uvicorn.Config(http=...)`); the subclass overrides only the asyncio protocol callbacks
(`connection_made`, `data_received`, `connection_lost`) and the answer-complete hook.
"""

from __future__ import annotations

import asyncio
import math
import resource
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service import metrics
from service.logging import get_logger
from service.settings import Settings

log = get_logger("service.server")

#: uvicorn's settings for `serve` (the benchmark's bare Starlette app runs with the same ones).
SERVER_OPTIONS: dict[str, Any] = {
    "log_config": None,
    "access_log": False,
    "timeout_keep_alive": 5,
    "h11_max_incomplete_event_size": 64 * 1024,
    "ws": "none",  # no route speaks WebSocket: an upgrade request is answered as plain HTTP
}

#: Request headers larger than this are refused (`431`), whichever parser reads them (h11 has
#: this limit built in, as `h11_max_incomplete_event_size`; httptools has none).
MAX_HEADER_BYTES = SERVER_OPTIONS["h11_max_incomplete_event_size"]

#: Open files the web process needs besides its clients' connections: the listening socket,
#: Redis connections, the event loop's own, standard streams, files the rules watcher opens.
#: About 20 at rest; the rest is headroom for Redis connections opened under load.
RESERVED_FILES = 64

#: At most one `connections_closed` summary line per this many seconds (an idle-connection
#: flood must not become a log flood); the metric counts every close.
_LOG_EVERY_S = 60.0


_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class HeaderDeadlines:
    """The connections of one server that are waiting for request headers, oldest first, and
    the one timer that closes those past their deadline."""

    def __init__(self, timeout_s: float, max_connections: int) -> None:
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.waiting: dict[Any, float] = {}  # connection -> deadline (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._closed = {"header_timeout": 0, "evicted": 0}
        self._logged_at = -math.inf

    def arm(self, connection: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.waiting.pop(connection, None)  # re-armed: to the end of the line
        deadline = loop.time() + self.timeout_s
        self.waiting[connection] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def disarm(self, connection: Any) -> None:
        self.waiting.pop(connection, None)

    def evict_oldest(self, newcomer: Any) -> None:
        """Make room for `newcomer`: close the connection that has waited longest for its
        headers (none waiting: every connection is busy, and uvicorn answers 503)."""
        for connection in self.waiting:
            if connection is not newcomer:
                del self.waiting[connection]
                self.close(connection, "evicted")
                return

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        while self.waiting:
            connection, deadline = next(iter(self.waiting.items()))
            if deadline > now:
                self._timer = loop.call_at(deadline, self._expire, loop)
                return
            del self.waiting[connection]
            self.close(connection, "header_timeout")

    def close(self, connection: Any, reason: str) -> None:
        if reason == "header_timeout":
            connection.close_unfinished(
                408, f"the request headers did not arrive within {self.timeout_s:g}s"
            )
        else:
            connection.close_unfinished(503, "too many connections; please retry")
        metrics.CONNECTIONS_CLOSED.labels(reason).inc()
        self._closed[reason] += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged_at >= _LOG_EVERY_S:
            log.warning(
                "connections_closed",
                **self._closed,
                header_timeout_s=self.timeout_s,
                max_connections=self.max_connections,
            )
            self._logged_at = now
            self._closed = dict.fromkeys(self._closed, 0)


class _HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol class (see `protocol_class`). Every method calls
    uvicorn's own first or last; attributes named here are uvicorn's."""

    deadlines: HeaderDeadlines
    # uvicorn's, declared for the type checker (this mixin's bases are set at run time)
    connections: set[Any]
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    timeout_keep_alive_task: asyncio.TimerHandle | None
    _header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        deadlines = self.deadlines
        self._header_bytes = 0
        deadlines.arm(self, self.loop)
        if len(self.connections) > deadlines.max_connections:
            deadlines.evict_oldest(self)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # the parser completed a request's headers
            self.deadlines.disarm(self)
            return
        self._header_bytes += len(data)  # counted only until headers complete (re-armed: 0)
        if self._header_bytes > MAX_HEADER_BYTES and self in self.deadlines.waiting:
            self.deadlines.disarm(self)
            self._answer_and_close(431, f"request headers over {MAX_HEADER_BYTES} bytes")

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.timeout_keep_alive_task is not None:  # uvicorn now waits for the next request
            self._header_bytes = 0
            self.deadlines.arm(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadlines.disarm(self)
        super().connection_lost(exc)  # type: ignore[misc]

    def close_unfinished(self, status: int, why: str) -> None:
        """Close a connection whose request headers are not complete: with an answer when part
        of a request arrived (the client is told why), silently when nothing did."""
        if self.transport.is_closing():
            return
        # No longer counted against the bound from now on: uvicorn forgets the connection in
        # `connection_lost`, a loop turn later, after the newcomer's request may have been
        # checked against `limit_concurrency` (and refused with 503).
        self.connections.discard(self)
        if self._header_bytes:
            self._answer_and_close(status, why)
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, why: str) -> None:
        body = b'{"status":"rejected","error":"' + why.encode() + b'"}'
        reason = _REASONS[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()


def protocol_class(
    deadlines: HeaderDeadlines, base: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (by default the one `--http auto` picks: httptools', or
    h11's without httptools), with header deadlines. A class per server: its connections
    share `deadlines`."""
    return type(f"Deadline{base.__name__}", (_HeaderDeadline, base), {"deadlines": deadlines})


def fit_open_files(max_connections: int) -> int:
    """How many connections this process can hold: `max_connections`, after raising the soft
    open-file limit as far as needed (up to the hard limit); fewer when the hard limit is
    too low, with a warning that says which setting to raise."""
    needed = max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # some sandboxes refuse; keep what we have
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    usable = max(soft - RESERVED_FILES, 1)
    log.warning(
        "connections_limited",
        max_connections=max_connections,
        held_at_most=usable,
        open_file_limit=soft,
        hint=f"raise the open-file limit to {needed} (systemd LimitNOFILE=, docker --ulimit "
        "nofile=, ulimit -n) or lower MAX_CONNECTIONS",
    )
    return usable


def options(settings: Settings) -> dict[str, Any]:
    """`uvicorn.run`'s keyword arguments for `serve`: `SERVER_OPTIONS`, the HTTP protocol with
    header deadlines, and the connection bound."""
    held = fit_open_files(settings.max_connections)
    deadlines = HeaderDeadlines(settings.header_timeout_s, held)
    return {
        **SERVER_OPTIONS,
        "http": protocol_class(deadlines),
        # uvicorn answers 503 to a request on a connection beyond this (`>=`, itself counted)
        "limit_concurrency": held + 1,
    }
