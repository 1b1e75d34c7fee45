"""A real Sentinel setup for the queue's Redis: a master, a replica and one Sentinel (quorum 1),
all the embedded `redis-server` binary (the Sentinel is the same binary with `--sentinel`)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from service.embedded import redis_server_binary
from tests.support.servers import free_port, wait_until

MASTER_NAME = "queue"
#: How long the Sentinel waits before it calls a silent master down (the failover's first part).
DOWN_AFTER_MS = 1000


class SentinelGroup:
    """Two Redis nodes replicating, watched by one Sentinel. `hold_replica()` stops the replica
    (SIGSTOP) so that the master's next writes never reach it: what asynchronous replication
    loses in a failover; `kill(master)` then `wait_promoted(master)` fail the master over."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = [free_port(), free_port()]
        self.sentinel_port = free_port()
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinel: subprocess.Popen[bytes] | None = None
        self.logs: list[object] = []

    @property
    def sentinels(self) -> str:
        """`QUEUE_REDIS_SENTINELS` for this group."""
        return f"127.0.0.1:{self.sentinel_port}"

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("ab")
        self.logs.append(log)
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def start_node(self, port: int, replica_of: int | None = None) -> None:
        data = self.folder / f"node-{port}"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(data), "--appendonly", "yes", "--save", "", "--loglevel", "warning",
        ]  # fmt: skip
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[port] = self._spawn(argv, f"node-{port}")
        wait_until(lambda: self.answers(lambda: self.client(port).ping()), timeout_s=20)

    def start(self) -> None:
        master, replica = self.ports
        self.start_node(master)
        self.start_node(replica, replica_of=master)
        wait_until(
            lambda: self.answers(lambda: self.replication(replica)["master_link_status"] == "up")
        )
        config = self.folder / "sentinel.conf"  # the Sentinel rewrites it: a file of its own
        config.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        self.sentinel = self._spawn([redis_server_binary(), str(config), "--sentinel"], "sentinel")
        wait_until(lambda: self.answers(lambda: self.known_replicas() >= 1), timeout_s=30)

    @staticmethod
    def answers(check: Callable[[], Any]) -> Any:
        """`check()`, with a Redis that does not answer (yet) as False."""
        try:
            return check()
        except RedisError:
            return False

    def replication(self, port: int) -> dict[str, Any]:
        client = self.client(port)
        try:
            info: dict[str, Any] = client.info("replication")
            return info
        finally:
            client.close()

    def client(self, port: int) -> Redis:
        return Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def sentinel_client(self) -> Redis:
        return Redis(port=self.sentinel_port, socket_timeout=2, decode_responses=True)

    def known_replicas(self) -> int:
        """Replicas the Sentinel knows and sees up."""
        client = self.sentinel_client()
        try:
            replicas = client.sentinel_slaves(MASTER_NAME)
        finally:
            client.close()
        return sum(1 for r in replicas if not r["is_sdown"] and not r["is_disconnected"])

    def master_port(self) -> int:
        client = self.sentinel_client()
        try:
            _, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
        finally:
            client.close()
        return int(port)

    def replica_port(self) -> int:
        master = self.master_port()
        return next(port for port in self.ports if port != master)

    def hold_replica(self) -> None:
        """Cut the replica off its master (pointed at a port where nothing listens): the
        master's next writes never reach it, as with a replica behind when its master dies.
        A SIGSTOPped replica would not do: the kernel keeps what the master sent in its
        socket's buffer, and the replica reads it all on SIGCONT. The Sentinel puts such a
        replica back in place only after the failover timeout, well after the test's kill."""
        client = self.client(self.replica_port())
        try:
            client.replicaof("127.0.0.1", free_port())
        finally:
            client.close()

    def kill(self, port: int) -> None:
        """SIGKILL a node (the master, to fail it over)."""
        self.nodes[port].send_signal(signal.SIGKILL)
        self.nodes[port].wait(timeout=10)

    def wait_promoted(self, old: int) -> int:
        """Wait until the Sentinel has promoted the replica in place of `old`. Returns the new
        master's port."""
        wait_until(lambda: self.master_port() != old, timeout_s=30)
        new = self.master_port()
        wait_until(lambda: self.answers(lambda: self.replication(new)["role"] == "master"), 30)
        return new

    def restart(self, port: int) -> None:
        """Start a killed node again: the Sentinel makes it a replica of the new master."""
        self.start_node(port)

    def stop(self) -> None:
        procs = [*self.nodes.values(), *([self.sentinel] if self.sentinel else [])]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self.logs:
            log.close()  # type: ignore[attr-defined]
