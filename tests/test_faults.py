"""Fault suite: real worker processes against the sandbox's fault switches.

Each scenario ends the same way: once nothing is in flight, every customer's balance at the
sandbox equals what the ledger says was sent to them, and equals what their orders earned.
The fast scenarios run in `make test`; `make chaos` runs the randomized ones (marker `chaos`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from service import inbox
from service.embedded import EmbeddedRedis
from service.processing import WEBHOOK_STREAM
from service.sandbox.app import Sandbox, create_sandbox_app
from service.webhooks import signed_headers
from tests.conftest import ROOT_DIR, SECRET, fixture_json
from tests.support.servers import free_port, serve_in_thread, wait_until

# Real processes on 2 cores: a scenario takes 20-60 s, more under load.
pytestmark = pytest.mark.timeout(240)

MERCHANT = 555000111
IN_FLIGHT = ("pending", "claimed", "parked", "unknown")


class Cluster:
    """Redis, the sandbox, one web process and N worker processes, all real."""

    def __init__(self, tmp: Path, sandbox_url: str, box: Sandbox, redis: EmbeddedRedis) -> None:
        self.tmp, self.sandbox_url, self.box, self.redis_server = tmp, sandbox_url, box, redis
        self.web_port = free_port()
        self.workers: list[subprocess.Popen[bytes]] = []
        self.web: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ, "REDIS_URL": redis.url, "SALLA_WEBHOOK_SECRET": SECRET,
            "SALLA_API_BASE": sandbox_url, "SALLA_OAUTH_TOKEN_URL": f"{sandbox_url}/oauth2/token",
            "LOG_FORMAT": "json", "BATCH_WINDOW_S": "0.1", "SALLA_TIMEOUT_S": "1",
            "CLAIM_TIMEOUT_S": "2", "RECONCILE_AFTER_S": "0.3", "RETRY_BASE_S": "0.1",
            "RETRY_CAP_S": "1", "JOB_TIMEOUT_S": "8", "MAX_CUSTOMERS_PER_CALL": "5",
            "WORKER_METRICS_PORT": "0",
        }  # fmt: skip
        self.sent_events = 0
        self.logs: list[Any] = []

    def log(self, name: str) -> Any:
        handle = (self.tmp / name).open("ab")
        self.logs.append(handle)
        return handle

    def start(self, workers: int) -> None:
        log = self.log("web.log")
        self.web = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port",
                                     str(self.web_port)], cwd=ROOT_DIR, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        for _ in range(workers):
            self.add_worker()
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.web_port}/readyz").status_code == 200)

    def add_worker(self) -> None:
        log = self.log(f"worker{len(self.workers)}.log")
        self.workers.append(subprocess.Popen([sys.executable, "-m", "service", "worker"],
                                             cwd=ROOT_DIR, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT))  # fmt: skip

    def kill_a_worker(self, rng: random.Random) -> None:
        """SIGKILL one live worker, and start a replacement (as a supervisor would)."""
        alive = [w for w in self.workers if w.poll() is None]
        if alive:
            rng.choice(alive).send_signal(signal.SIGKILL)
        self.add_worker()

    def restart_dead_workers(self) -> None:
        """A worker that exited by itself (e.g. arq's poll lost Redis) is started again once, as
        a supervisor would (SIGKILLed ones were already replaced by `kill_a_worker`)."""
        dead = [w for w in self.workers if w.poll() is not None and w.returncode != -signal.SIGKILL]
        for worker in dead:
            self.workers.remove(worker)
            self.add_worker()

    def post(self, doc: dict[str, Any]) -> None:
        body = json.dumps(doc, ensure_ascii=False).encode()
        answer = httpx.post(f"http://127.0.0.1:{self.web_port}/webhooks/salla", content=body,
                            headers=signed_headers(body, SECRET), timeout=10)  # fmt: skip
        assert answer.status_code == 200, answer.text
        self.sent_events += 1

    def install(self, rate_limit: int = 1000) -> None:
        # The plan bucket (every Admin API call) as large: the suite sizes the customers bucket.
        store = self.box.add_store(MERCHANT, rate_limit=rate_limit, rate_window_s=60,
                                   plan_rate_limit=rate_limit, plan_rate_window_s=60)  # fmt: skip
        doc = fixture_json("app.store.authorize.json")
        doc["merchant"] = MERCHANT
        doc["data"].update(access_token=store.access_token, refresh_token=store.refresh_token,
                           expires=int(store.access_expires_at))  # fmt: skip
        self.post(doc)

    def order(self, order_id: int, customer: int, total: int, status: str) -> None:
        self.post({
            "event": "order.cancelled" if status == "canceled" else "order.updated",
            "merchant": MERCHANT, "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "data": {"id": order_id, "reference_id": order_id, "status": {"slug": status},
                     "amounts": {"total": {"amount": total}}, "customer": {"id": customer}},
        })  # fmt: skip

    def stop(self) -> None:
        for proc in [*self.workers, self.web]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, self.web]:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for handle in self.logs:
            handle.close()


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


def _inbox_backlog(client: Redis) -> int:
    pending, unread, _ = client.eval(inbox.BACKLOG_SCRIPT, 1, WEBHOOK_STREAM, inbox.GROUP, "1000")
    return int(pending) + int(unread)


def settled(cluster: Cluster, timeout_s: float = 90) -> dict[str, Any]:
    """Wait until no grant is in flight; return the ledger's view per customer."""
    client = Redis.from_url(cluster.redis_server.url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            cluster.restart_dead_workers()
            accepted = sum(1 for _ in client.scan_iter("sr:seen:*"))
            unprocessed = _inbox_backlog(client)
            busy = sum(client.zcard(f"sr:{kind}:{MERCHANT}") for kind in IN_FLIGHT)
            queued = client.zcard("arq:queue")
            if accepted >= cluster.sent_events and unprocessed == 0 and busy == 0 and queued <= 4:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled: accepted {accepted}/{cluster.sent_events}, "
                                     f"unprocessed {unprocessed}, in flight {busy}, "
                                     f"queued {queued}")  # fmt: skip
            time.sleep(0.2)
        sent: dict[int, int] = {}
        states: dict[str, int] = {}
        for key in client.scan_iter("sr:grant:*"):
            grant = client.hgetall(key)
            states[grant["state"]] = states.get(grant["state"], 0) + 1
            if grant["state"] == "sent":
                sign = 1 if grant["type"] == "plus" else -1
                customer = int(grant["customer"])
                sent[customer] = sent.get(customer, 0) + sign * int(grant["points"])
        granted: dict[int, int] = {}
        for key in client.scan_iter(f"sr:led:{MERCHANT}:order:*"):
            for name, value in client.hgetall(key).items():
                if name.startswith("r:"):
                    for customer, points in json.loads(value)["granted"].items():
                        granted[int(customer)] = granted.get(int(customer), 0) + points
        return {"sent": sent, "granted": granted, "states": states}
    finally:
        client.close()


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
        cluster.redis_server.stop()  # SHUTDOWN: the AOF is flushed
        cluster.redis_server.start()
        earned_more = run_orders(cluster, rng, 0)
        assert earned_more == {}
        for n in range(10, 20):
            customer, total = 9000 + n % 7, rng.randint(10, 900)
            cluster.order(70000 + n, customer, total, "completed")
            earned[customer] = earned.get(customer, 0) + total // 10
        assert_books_balance(cluster, settled(cluster), earned)
        # The restart paused the workers; none of them ended (and had to be started again).
        assert len(cluster.workers) == 2
        assert all(worker.poll() is None for worker in cluster.workers)


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
