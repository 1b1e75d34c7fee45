"""Fault suite: real worker processes against the sandbox's fault switches.

Each scenario ends the same way: once nothing is in flight, every customer's balance at the
sandbox equals what the ledger says was sent to them, and equals what their orders earned.
The fast scenarios run in `make test`; `make chaos` runs the randomized ones (marker `chaos`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.embedded import EmbeddedRedis
from service.sandbox.app import Sandbox, create_sandbox_app
from tests.support.cluster import MERCHANT, Cluster, settled
from tests.support.servers import free_port, serve_in_thread, wait_until

# Real processes on 2 cores: a scenario takes 20-60 s, more under load.
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    box = Sandbox(rate_limit=1000, rate_window_s=60)
    with serve_in_thread(create_sandbox_app(box)) as url:
        redis = EmbeddedRedis(tmp_path / "redis", free_port())
        redis.start()
        group = Cluster(tmp_path, url, box, redis)
        try:
            yield group
        finally:
            group.stop()
            redis.stop()


def assert_books_balance(cluster: Cluster, view: dict[str, Any], deserved: dict[int, int]) -> None:
    store = cluster.box.stores[MERCHANT]
    balances = {c: b for c, b in store.balances.items() if b}
    sent = {c: p for c, p in view["sent"].items() if p}
    assert balances == sent, "sandbox balances differ from what the ledger says was sent"
    assert sent == {c: p for c, p in deserved.items() if p}, "sent differs from what was earned"
    assert view["states"].get("review", 0) == 0 and view["states"].get("failed", 0) == 0


def run_orders(
    cluster: Cluster, rng: random.Random, orders: int, chaos: Any = None
) -> dict[int, int]:
    """Complete `orders` orders (some later canceled); return what each customer earned."""
    earned: dict[int, int] = {}
    for n in range(orders):
        customer = 9000 + n % 7
        total = rng.randint(10, 900)
        cluster.order(70000 + n, customer, total, "completed")
        earned[customer] = earned.get(customer, 0) + total // 10
        if rng.random() < 0.25:
            cluster.order(70000 + n, customer, total, "canceled")
            earned[customer] -= total // 10
        if chaos is not None:
            chaos(n)
    return earned


class TestFaultsFast:
    """The fast subset: each fault once, two workers, a SIGKILL."""

    def test_5xx_burst_drops_and_a_killed_worker_lose_nothing(self, cluster: Cluster) -> None:
        rng = random.Random(7)
        cluster.start(workers=2)
        cluster.install()
        store = cluster.box.stores[MERCHANT]
        store.faults.statuses = [503, 500, 503]
        store.faults.drop_after_apply = 2
        store.faults.drop_before_apply = 1

        def chaos(n: int) -> None:
            if n == 12:
                cluster.kill_a_worker(rng)
            if n == 20:
                store.faults.statuses = [429, 429]

        earned = run_orders(cluster, rng, 30, chaos)
        view = settled(cluster)
        assert_books_balance(cluster, view, earned)
        assert store.counters.get("dropped_after_apply") == 2
        assert store.counters.get("dropped_before_apply") == 1

    def test_three_workers_on_one_store_pay_once(self, cluster: Cluster) -> None:
        rng = random.Random(11)
        cluster.start(workers=3)
        cluster.install()
        earned = run_orders(cluster, rng, 30)
        assert_books_balance(cluster, settled(cluster), earned)

    def test_redis_restart_loses_nothing_acknowledged(self, cluster: Cluster) -> None:
        rng = random.Random(3)
        cluster.start(workers=2)
        cluster.install()
        earned = run_orders(cluster, rng, 10)
        workers = list(cluster.workers)
        cluster.redis_server.stop()  # SHUTDOWN: the AOF is flushed
        # Longer than redis-py's retries (under 3 s): arq's loop itself loses Redis, and the
        # worker process has to wait it out (worker.run_worker), not just retry a command.
        time.sleep(6)
        cluster.redis_server.start()
        for n in range(10, 20):  # sent after Redis is back
            customer, total = 9000 + n % 7, rng.randint(10, 900)
            cluster.order(70000 + n, customer, total, "completed")
            earned[customer] = earned.get(customer, 0) + total // 10
        assert_books_balance(cluster, settled(cluster), earned)
        # The outage paused the workers; none of them ended (and had to be started again).
        assert cluster.workers == workers
        assert all(worker.poll() is None for worker in workers)
        for n in range(2):  # each lost arq's loop, waited, and resumed it
            log = cluster.tmp / f"worker{n}.log"
            wait_until(lambda log=log: "worker_redis_back" in log.read_text())
            assert "worker_redis_unavailable" in log.read_text()


@pytest.mark.chaos
class TestChaos:
    """Randomized: storms, latency beyond the timeout, drops, repeated SIGKILLs, 3 workers."""

    @pytest.mark.parametrize("seed", range(5))
    def test_random_faults(self, cluster: Cluster, seed: int) -> None:
        rng = random.Random(seed)
        cluster.start(workers=3)
        cluster.install()
        store = cluster.box.stores[MERCHANT]

        def chaos(n: int) -> None:
            roll = rng.random()
            if roll < 0.15:
                store.faults.statuses = [rng.choice([429, 500, 502, 503])] * rng.randint(1, 6)
            elif roll < 0.25:
                store.faults.drop_after_apply += 1
            elif roll < 0.32:
                store.faults.drop_before_apply += 1
            elif roll < 0.40:
                cluster.kill_a_worker(rng)
            elif roll < 0.45:
                store.faults.latency_s = 1.5  # beyond SALLA_TIMEOUT_S: unknown outcomes
            else:
                store.faults.latency_s = 0.0

        earned = run_orders(cluster, rng, 80, chaos)
        store.faults.latency_s = 0.0
        store.faults.statuses = []
        assert_books_balance(cluster, settled(cluster, timeout_s=240), earned)
