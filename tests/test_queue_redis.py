"""arq's queue on a Redis of its own (`QUEUE_REDIS_URL`, or Sentinel-managed), and nothing on it
that the state store cannot make again: app events travel in a stream of the state store that
keeps no token once processed, and the sweep queues again what a failover lost."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from service import keys, ledger, queue, tokens
from service.embedded import EmbeddedRedis
from service.errors import ConfigError
from service.orders import schedule
from service.sandbox.app import Sandbox, create_sandbox_app
from service.settings import load_settings
from service.worker_resources import of
from tests.conftest import (
    ROOT_DIR,
    Service,
    authorize_data_first,
    eventually,
    make_settings,
    running_worker,
)
from tests.support.cli import CLI
from tests.support.cluster import Cluster
from tests.support.sentinel import MASTER_NAME, SentinelGroup
from tests.support.servers import free_port, serve_in_thread, wait_until
from tests.support.store import authorize_body

STORE = 4411


@pytest.fixture(scope="module")
def queue_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second real redis-server: the queue's own."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("queue-redis"), free_port())
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
async def queue_redis(queue_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(queue_url, decode_responses=True)
    await client.flushall()
    yield client
    await client.aclose()


def authorize(merchant: int, box: Sandbox) -> bytes:
    return authorize_body(merchant, box.add_store(merchant))


def completed_order(merchant: int, order_id: int, customer: int, total: int = 100) -> bytes:
    return json.dumps(
        {
            "event": "order.updated",
            "merchant": merchant,
            "created_at": "2026-11-20 10:00:00",
            "data": {
                "id": order_id,
                "reference_id": order_id,
                "status": {"slug": "completed"},
                "amounts": {"total": {"amount": total}},
                "customer": {"id": customer},
            },
        }
    ).encode()


class TestSettings:
    """A Sentinel-managed queue is named by its Sentinels and its master's name, together."""

    @pytest.mark.parametrize(
        ("env", "refusal"),
        [
            (
                {"QUEUE_REDIS_SENTINELS": "s1:26379"},
                "QUEUE_REDIS_SENTINELS is set without QUEUE_REDIS_SENTINEL_MASTER",
            ),
            (
                {"QUEUE_REDIS_SENTINEL_MASTER": "queue"},
                "QUEUE_REDIS_SENTINEL_MASTER is set without QUEUE_REDIS_SENTINELS",
            ),
            (
                {"QUEUE_REDIS_SENTINELS": "s1:26379,s2", "QUEUE_REDIS_SENTINEL_MASTER": "q"},
                "QUEUE_REDIS_SENTINELS: 's2' is not host:port",
            ),
            (
                {"QUEUE_REDIS_SENTINELS": "s1:99999", "QUEUE_REDIS_SENTINEL_MASTER": "q"},
                "QUEUE_REDIS_SENTINELS: 's1:99999' is not host:port",
            ),
            ({"QUEUE_REDIS_URL": "http://queue:6379"}, "QUEUE_REDIS_URL: must start with"),
            (
                {
                    "QUEUE_REDIS_URL": "rediss://queue:6380/0",
                    "QUEUE_REDIS_SENTINELS": "s1:26379",
                    "QUEUE_REDIS_SENTINEL_MASTER": "q",
                },
                "QUEUE_REDIS_URL is rediss:// but arq's Sentinel mode cannot pass TLS",
            ),
            (
                {"REDIS_CLUSTER": "true", "REDIS_URL": "redis://node-1:6379"},
                "REDIS_CLUSTER=true needs a queue Redis of its own",
            ),
            (
                {"REDIS_CLUSTER": "true", "QUEUE_REDIS_URL": "redis://queue:6379"},
                "REDIS_CLUSTER=true needs REDIS_URL set to one of the cluster's nodes",
            ),
            ({"INBOX_SHARDS": "0"}, "INBOX_SHARDS"),
        ],
    )
    def test_a_bad_combination_is_one_sentence(
        self, env: dict[str, str], refusal: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError) as refused:
            load_settings(app_env="development")
        assert refusal in refused.value.message
        assert refused.value.hint

    def test_the_queue_defaults_to_the_state_store(self) -> None:
        where = queue.target(make_settings(), "redis://127.0.0.1:7000/0")
        assert where == queue.QueueTarget("redis://127.0.0.1:7000/0")

    def test_sentinels_take_the_masters_password_and_db_from_the_url(self) -> None:
        settings = make_settings(
            queue_redis_url="redis://:s3cret-pw@ignored:1/3",
            queue_redis_sentinels="10.0.0.1:26379, [::1]:26380",
            queue_redis_sentinel_master="queue",
        )
        arq_settings = queue.redis_settings(queue.target(settings, "redis://state/0"))
        assert arq_settings.sentinel and arq_settings.sentinel_master == "queue"
        assert arq_settings.host == [("10.0.0.1", 26379), ("::1", 26380)]
        assert (arq_settings.password, arq_settings.database) == ("s3cret-pw", 3)

    @pytest.mark.parametrize("command", ["serve", "worker"])
    def test_a_mistake_stops_the_command_with_exit_2(self, command: str, tmp_path: Path) -> None:
        env = {
            "PATH": "/usr/bin:/bin", "LOG_FORMAT": "json", "APP_ENV": "development",
            "DATA_DIR": str(tmp_path), "QUEUE_REDIS_SENTINELS": "sentinel-1",
            "QUEUE_REDIS_SENTINEL_MASTER": "queue", "SALLA_REWARDS_ENV_FILE": "",
        }  # fmt: skip
        argv = [*CLI, command, *(["--port", str(free_port())] if command == "serve" else [])]
        result = subprocess.run(
            argv, cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        (line,) = (result.stdout + result.stderr).splitlines()
        refusal = json.loads(line)
        assert refusal["error"].startswith("invalid settings: QUEUE_REDIS_SENTINELS: ")
        assert "not host:port" in refusal["error"] and refusal["hint"]
        assert not (tmp_path / "redis").exists()  # refused before anything started

    def test_sentinels_that_do_not_answer_stop_the_worker(self, tmp_path: Path) -> None:
        env = {
            "PATH": "/usr/bin:/bin", "LOG_FORMAT": "json", "APP_ENV": "development",
            "DATA_DIR": str(tmp_path), "EMBEDDED_REDIS_PORT": str(free_port()),
            "QUEUE_REDIS_SENTINELS": f"127.0.0.1:{free_port()}",
            "QUEUE_REDIS_SENTINEL_MASTER": "queue", "SALLA_REWARDS_ENV_FILE": "",
        }  # fmt: skip
        result = subprocess.run(
            [*CLI, "worker"], cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result.stderr
        (line,) = (result.stdout + result.stderr).splitlines()
        refusal = json.loads(line)
        assert refusal["error"].startswith("no Sentinel of 127.0.0.1:")
        assert "QUEUE_REDIS_SENTINEL_MASTER" in refusal["hint"]


@contextlib.contextmanager
def web_on(settings: Any, state_url: str) -> Iterator[Service]:
    from service.app import create_app

    with serve_in_thread(create_app(settings, state_url)) as url:
        yield Service(url, settings)


@dataclass
class Split:
    """The state on the session's Redis, arq's queue on a second one, and the sandbox."""

    state: Redis
    state_url: str
    queue: Redis
    queue_url: str
    box: Sandbox
    sandbox_url: str

    def settings(self, **overrides: Any) -> Any:
        return make_settings(self.sandbox_url, queue_redis_url=self.queue_url, **overrides)

    @contextlib.asynccontextmanager
    async def running(self, **overrides: Any) -> AsyncIterator[tuple[Service, Any]]:
        """The web (on a thread) and a worker (in this loop), both with the queue apart."""
        settings = self.settings(**overrides)
        with web_on(settings, self.state_url) as web:
            async with running_worker(settings, self.state_url) as worker:
                yield web, worker

    async def queued(self, prefix: str) -> list[str]:
        return [j for j in await self.queue.zrange("arq:queue", 0, -1) if j.startswith(prefix)]


@pytest.fixture
def split(
    redis: Redis,
    redis_url: str,
    queue_url: str,
    queue_redis: Redis,
    sandbox: tuple[str, Sandbox],
) -> Split:
    return Split(redis, redis_url, queue_redis, queue_url, sandbox[1], sandbox[0])


class TestSeparateQueue:
    """The queue on its own Redis: jobs there, state here, and the state remakes the jobs."""

    async def test_jobs_live_on_the_queue_and_state_on_redis_url(self, split: Split) -> None:
        async with split.running(batch_window_s=0.05) as (web, _):
            assert web.post_webhook(authorize(STORE, split.box)).status_code == 200
            assert web.post_webhook(completed_order(STORE, 1, 501)).status_code == 200
            await eventually(lambda: split.box.stores[STORE].balances.get(501) == 10)
            assert [k async for k in split.queue.scan_iter("arq:*")]  # cron, health check
        assert not [k async for k in split.state.scan_iter("arq:*")]  # no arq key on the state
        assert await split.state.exists(keys.store(STORE))
        assert not [k async for k in split.queue.scan_iter("sr:*")]

    async def test_the_sweep_queues_again_a_flush_the_queue_lost(self, split: Split) -> None:
        # A long batch window: the order's flush job waits on the queue, to be lost there.
        async with split.running(batch_window_s=2.0) as (web, _):
            assert web.post_webhook(authorize(STORE, split.box)).status_code == 200
            await eventually(lambda: tokens.get(split.state, STORE))
            assert web.post_webhook(completed_order(STORE, 2, 502)).status_code == 200
            await eventually(lambda: ledger.due_count(split.state, STORE))
            await eventually(lambda: split.queued(f"flush:{STORE}:"))
            await split.queue.flushall()  # what a failover to a replica that missed it loses
            # Nothing but the sweep (every 5 s) can queue the store's flush again.
            await eventually(lambda: split.box.stores[STORE].balances.get(502) == 10, 20)
        assert await split.state.zcard(keys.grant_set("pending", STORE)) == 0

    async def test_a_lost_orders_reconciliation_is_queued_again(self, split: Split) -> None:
        redis = split.state
        # A ten-day period: the worker's own scheduler and this test's calls fall in one
        # period (the same run, whichever starts it), unless the store's period turns within
        # the test's few seconds.
        every = 10 * 86400
        async with split.running(orders_reconcile_every_s=every) as (web, worker):
            assert web.post_webhook(authorize(STORE, split.box)).status_code == 200
            due = keys.orders_reconcile_due(keys.index_shard(STORE))
            await eventually(lambda: redis.zscore(due, str(STORE)))
            deps = of(worker.ctx).delivery  # the worker has started: it processed the event
            # This period's run: started once (by the worker's own scheduler, or here), and
            # finished (its mark is set).
            now = int(time.time())
            await schedule.start_due(deps, now)
            slot = await redis.get(keys.orders_reconcile_slot(STORE))
            await eventually(lambda: redis.get(keys.orders_reconcile_done(STORE)))
            assert await redis.get(keys.orders_reconcile_done(STORE)) == slot
            later = now + schedule.CHECK_AFTER_S
            assert (await schedule.start_due(deps, later)).started == 0  # done: not again
            # The same period, started but lost with the queue before it finished.
            await redis.delete(keys.orders_reconcile_done(STORE))
            await redis.zadd(due, {str(STORE): later})
            await split.queue.flushall()
            assert (await schedule.start_due(deps, later)).recreated == 1
            await eventually(lambda: redis.get(keys.orders_reconcile_done(STORE)))
            # Lost again: once per period is enough (a run failing for good waits, as before).
            await redis.delete(keys.orders_reconcile_done(STORE))
            await split.queue.flushall()
            later += schedule.CHECK_AFTER_S
            assert (await schedule.start_due(deps, later)).started == 0
            # Started and still queued or running: never twice.
            await redis.set(keys.orders_reconcile_slot(STORE), slot)
            await redis.zadd(due, {str(STORE): later})
            job_id = queue.orders_reconcile_id(STORE, int(slot))
            await queue.enqueue(
                worker.pool, queue.ORDERS_RECONCILE, STORE, int(slot), job_id=job_id, defer_s=60
            )
            assert (await schedule.start_due(deps, later)).started == 0


class TestAppEventsStream:
    """App lifecycle events: in a stream of the state store, never arq jobs, gone once done."""

    async def test_tokens_are_not_kept_once_the_event_is_processed(self, split: Split) -> None:
        redis, redis_url, queue_url, queue_redis = (
            split.state,
            split.state_url,
            split.queue_url,
            split.queue,
        )
        settings = split.settings()
        access_token = "AT-stream-" + "k" * 30
        with web_on(settings, redis_url) as web:
            first = authorize_data_first(STORE, access_token, "RT-stream-refresh")
            assert web.post_webhook(first).json()["status"] == "accepted"
            assert web.post_webhook(first).json()["status"] == "duplicate"
            # Written to the state store's stream before the 200; no arq job anywhere.
            entries = await redis.xrange(keys.APP_EVENTS_STREAM)
            assert len(entries) == 1 and access_token in entries[0][1]["body"]
            assert not [k async for k in queue_redis.scan_iter("arq:job:*")]
            uninstall = {"event": "app.uninstalled", "merchant": STORE + 1, "data": {}}
            uninstall["created_at"] = "2026-11-20 10:00:00"
            assert web.post_webhook(json.dumps(uninstall).encode()).status_code == 200
            async with running_worker(settings, redis_url):
                stored = await eventually(lambda: tokens.get(redis, STORE))
                assert stored.access_token == access_token
                await eventually(lambda: _stream_empty(redis))
        # No token in any stream or arq key, even in the raw bytes Redis keeps (a DUMP shows
        # what XDEL leaves in a stream's node until the node goes).
        raw = SyncRedis.from_url(redis_url)
        try:
            for key in raw.scan_iter(_type="stream"):
                assert access_token.encode() not in raw.dump(key), key
        finally:
            raw.close()
        queue_raw = SyncRedis.from_url(queue_url)
        try:
            for key in queue_raw.scan_iter("*"):
                assert access_token.encode() not in (queue_raw.dump(key) or b""), key
        finally:
            queue_raw.close()
        info = await redis.xinfo_groups(keys.APP_EVENTS_STREAM)
        assert [group["pending"] for group in info] == [0]

    async def test_one_stores_events_apply_in_event_time_order(
        self, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        """An uninstall and an older authorize written in one batch: the uninstall wins."""
        url, _ = sandbox
        settings = make_settings(url)
        with web_on(settings, redis_url) as web:
            uninstall = {"event": "app.uninstalled", "merchant": STORE, "data": {}}
            uninstall["created_at"] = "2026-11-20 11:00:00"
            assert web.post_webhook(json.dumps(uninstall).encode()).status_code == 200
            older = authorize_data_first(STORE, "AT-older-" + "x" * 20, "RT-older")
            assert web.post_webhook(older).status_code == 200  # stamped 10:00: older
            async with running_worker(settings, redis_url):
                await eventually(lambda: _stream_empty(redis))
        assert await tokens.get(redis, STORE) is None


async def _stream_empty(redis: Redis) -> bool:
    if await redis.xlen(keys.APP_EVENTS_STREAM):
        return False
    groups = await redis.xinfo_groups(keys.APP_EVENTS_STREAM)
    return all(group["pending"] == 0 for group in groups)


# --- a real Sentinel, real processes ---------------------------------------------------------

FIRST, SECOND = 7_100_001, 7_100_002  # the store whose jobs the failover loses; the other


def _install(cluster: Cluster, merchant: int) -> None:
    store = cluster.box.add_store(merchant, rate_limit=1000, rate_window_s=60,
                                  plan_rate_limit=1000, plan_rate_window_s=60)  # fmt: skip
    cluster.post(json.loads(authorize_body(merchant, store)))


def _order(cluster: Cluster, merchant: int, order_id: int) -> int:
    """A completed order of 100 SAR (10 points) for a customer of its own; the customer."""
    customer = 9_000 + order_id
    cluster.post(json.loads(completed_order(merchant, order_id, customer)))
    return customer


def _queued_flushes(client: SyncRedis, merchant: int) -> set[str]:
    return {
        job.decode()
        for job in client.zrange("arq:queue", 0, -1)
        if job.decode().startswith(f"flush:{merchant}:")
    }


def _grants_sent(state: SyncRedis, merchant: int) -> dict[int, int]:
    """Points the ledger says were sent, per customer."""
    sent: dict[int, int] = {}
    for key in state.scan_iter(keys.grant_prefix(merchant) + "*"):
        grant = {k.decode(): v.decode() for k, v in state.hgetall(key).items()}
        if grant["state"] == "sent":
            sign = 1 if grant["type"] == "plus" else -1
            customer = int(grant["customer"])
            sent[customer] = sent.get(customer, 0) + sign * int(grant["points"])
    return sent


@contextlib.contextmanager
def sentinel_cluster(
    tmp_path: Path, workers: int
) -> Iterator[tuple[Cluster, SentinelGroup, SyncRedis]]:
    """The state on a standalone Redis; arq's queue on a master + replica behind a Sentinel;
    one web and `workers` worker processes that know the queue only through the Sentinel;
    the stores FIRST and SECOND installed."""
    box = Sandbox(rate_limit=1000, rate_window_s=60)
    (tmp_path / "sentinel").mkdir()
    group = SentinelGroup(tmp_path / "sentinel")
    state = EmbeddedRedis(tmp_path / "state", free_port())
    with contextlib.ExitStack() as stack, serve_in_thread(create_sandbox_app(box)) as url:
        stack.callback(state.stop)
        state.start()
        stack.callback(group.stop)
        group.start()
        cluster = Cluster(tmp_path, url, box, state)
        stack.callback(cluster.stop)
        cluster.env.update(
            QUEUE_REDIS_SENTINELS=group.sentinels, QUEUE_REDIS_SENTINEL_MASTER=MASTER_NAME,
            BATCH_WINDOW_S="2", INBOX_CLAIM_AFTER_S="2", WORKER_HEALTH_INTERVAL_S="1",
        )  # fmt: skip
        client = SyncRedis.from_url(state.url)
        stack.callback(client.close)
        cluster.start(workers=workers)
        _install(cluster, FIRST)
        _install(cluster, SECOND)
        yield cluster, group, client


def _settled(cluster: Cluster, state: SyncRedis, customers: dict[int, set[int]]) -> None:
    """Every customer of every store got its 10 points, once, by the ledger and by Salla."""

    def done() -> bool:
        cluster.restart_dead_workers()
        return all(
            cluster.box.stores[m].balances.get(c) == 10 for m, cs in customers.items() for c in cs
        )

    wait_until(done, timeout_s=60)
    for merchant, expected in customers.items():
        sent = _grants_sent(state, merchant)
        assert sent == {c: 10 for c in expected}, merchant
        assert cluster.box.stores[merchant].balances == sent  # Salla saw each grant once


@pytest.mark.slow
@pytest.mark.timeout(240)  # five processes and a failover on a loaded 2-core machine
class TestSentinelFailover:
    def test_a_failover_mid_traffic_loses_nothing_and_pays_once(self, tmp_path: Path) -> None:
        with sentinel_cluster(tmp_path, workers=1) as (cluster, group, state):
            customers: dict[int, set[int]] = {FIRST: set(), SECOND: set()}
            # End to end through the Sentinel: an order becomes points.
            customers[FIRST].add(_order(cluster, FIRST, 1))
            wait_until(lambda: cluster.box.stores[FIRST].balances.get(9_001) == 10, 60)
            # The replica falls behind; the first store's flush jobs wait on the master only.
            group.hold_replica()
            customers[FIRST] |= {_order(cluster, FIRST, n) for n in range(2, 6)}
            master = group.client(group.master_port())
            wait_until(lambda: _queued_flushes(master, FIRST) and not _inbox_left(state), 20)
            lost = _queued_flushes(master, FIRST)
            master.close()
            # Traffic goes on while the master dies and the Sentinel promotes the replica: the
            # web answers from the state store, so every webhook is acknowledged.
            started = time.monotonic()
            old = group.master_port()
            group.kill(old)
            customers[SECOND] |= {_order(cluster, SECOND, n) for n in range(100, 104)}
            new_port = group.wait_promoted(old)
            failover_s = time.monotonic() - started
            new_master = group.client(new_port)
            assert not lost & _queued_flushes(new_master, FIRST)  # the failover lost them
            new_master.close()
            customers[SECOND] |= {_order(cluster, SECOND, n) for n in range(104, 108)}
            _settled(cluster, state, customers)
            worker_log = (tmp_path / "worker0.log").read_text()
            assert "worker_redis_back" in worker_log  # arq's loop met the failover and resumed
            check = subprocess.run([*CLI, "worker", "--check"], env=cluster.env, cwd=ROOT_DIR,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            assert check.returncode == 0, check.stderr  # through the Sentinel, after it all
            print(f"failover: {failover_s:.1f} s from SIGKILL to a promoted master")


def _inbox_left(state: SyncRedis) -> int:
    from tests.support.cluster import inbox_backlog

    return inbox_backlog(state, 1)


@pytest.mark.chaos
@pytest.mark.timeout(600)
class TestSentinelChaos:
    def test_repeated_failovers_under_steady_traffic(self, tmp_path: Path) -> None:
        """Three failovers, each with the replica held behind, while orders keep coming."""
        with sentinel_cluster(tmp_path, workers=2) as (cluster, group, state):
            customers: dict[int, set[int]] = {FIRST: set(), SECOND: set()}
            order_id = lost_jobs = 0
            for _round in range(3):
                group.hold_replica()
                for _ in range(10):
                    order_id += 1
                    customers[FIRST if order_id % 2 else SECOND].add(
                        _order(cluster, FIRST if order_id % 2 else SECOND, order_id)
                    )
                old = group.master_port()
                before = group.client(old)
                wait_until(lambda: _queued_flushes(before, FIRST), timeout_s=20)  # noqa: B023
                queued = _queued_flushes(before, FIRST) | _queued_flushes(before, SECOND)
                before.close()
                group.kill(old)
                for _ in range(6):
                    order_id += 1
                    customers[SECOND].add(_order(cluster, SECOND, order_id))
                after = group.client(group.wait_promoted(old))
                lost_jobs += len(
                    queued - _queued_flushes(after, FIRST) - _queued_flushes(after, SECOND)
                )
                after.close()
                group.restart(old)  # it comes back as the new master's replica
                wait_until(lambda: group.known_replicas() >= 1, timeout_s=30)
                wait_until(
                    lambda: httpx.get(f"http://127.0.0.1:{cluster.web_port}/readyz").is_success
                )
            _settled(cluster, state, customers)
            assert lost_jobs  # the failovers did lose queued flushes, and nothing was lost
