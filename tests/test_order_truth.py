"""Order truth end to end: real worker processes, the sandbox as a Salla store, real webhooks.

Random order lives go through the sandbox's `POST /_sandbox/orders`, which sends each change's
signed webhook to the service as a store would: some share one second, some are sent twice,
some are held back and delivered later in a shuffled order, and a worker is SIGKILLed on the
way. Once everything is quiet, every customer's balance at the sandbox equals what the orders'
real final states deserve (1 point per 10 SAR once completed, nothing once canceled or
returned), and stays so. An outage loses webhooks for good; reconciliation recovers them. A
held grant whose cancel webhook was lost is never paid.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from service import keys
from service.embedded import EmbeddedRedis
from service.sandbox.app import Sandbox, create_sandbox_app
from tests.conftest import ROOT_DIR, SECRET, fixture_json
from tests.support.cluster import Cluster
from tests.support.servers import free_port, serve_in_thread

pytestmark = pytest.mark.timeout(300)

STORES = (611000001, 611000002)
CUSTOMERS = (7001, 7002, 7003, 7004)
IN_FLIGHT = ("pending", "claimed", "parked", "unknown", "verifying")
REVOKING = ("canceled", "restored")


@pytest.fixture
def store_cluster(tmp_path: Path) -> Iterator[Cluster]:
    box = Sandbox(rate_limit=1000, rate_window_s=60, plan_rate_limit=1000, plan_rate_window_s=60)
    with serve_in_thread(create_sandbox_app(box)) as url:
        redis = EmbeddedRedis(tmp_path / "redis", free_port())
        redis.start()
        group = Cluster(tmp_path, url, box, redis)
        group.env["ORDERS_RECONCILE_EVERY_S"] = "0"  # the tests run it when they mean to
        box.send_webhooks_to(f"http://127.0.0.1:{group.web_port}/webhooks/salla", SECRET)
        try:
            yield group
        finally:
            group.stop()
            redis.stop()


def install(cluster: Cluster, merchant: int) -> None:
    """The store installs the app with `orders.read`: the sandbox's store, our tokens."""
    store = cluster.box.add_store(merchant, rate_limit=1000, rate_window_s=60,
                                  plan_rate_limit=1000, plan_rate_window_s=60)  # fmt: skip
    doc = fixture_json("app.store.authorize.json")
    doc["merchant"] = merchant
    doc["data"].update(access_token=store.access_token, refresh_token=store.refresh_token,
                       expires=int(store.access_expires_at), scope=store.scope)  # fmt: skip
    cluster.post(doc)


def deserved(box: Sandbox, merchant: int) -> dict[int, int]:
    """What each customer deserves from the orders' real final states (the shipped rules)."""
    out: dict[int, int] = {}
    for order_id in box.stores[merchant].orders:
        order = box.order(merchant, order_id)
        assert order is not None
        slug = order["status"]["slug"]
        completed_once = slug == "completed" or order.get("first_complete_at")
        if completed_once and slug not in REVOKING:
            customer = int(order["customer"]["id"])
            total = int(float(order["amounts"]["total"]["amount"]))
            out[customer] = out.get(customer, 0) + total // 10
    return {c: p for c, p in out.items() if p}


def balances(box: Sandbox, merchant: int) -> dict[int, int]:
    return {c: p for c, p in box.stores[merchant].balances.items() if p}


def quiet(cluster: Cluster, merchants: tuple[int, ...], timeout_s: float = 150) -> None:
    """Wait until every webhook was delivered and processed and nothing is in flight."""
    client = Redis.from_url(cluster.redis_server.url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    calm = 0
    try:
        while time.monotonic() < deadline:
            cluster.restart_dead_workers()
            waiting = sum(
                1
                for m in merchants
                for w in cluster.box.stores[m].webhooks
                if w.get("fate") in ("delayed", "held", "retrying")
            )
            backlog = _backlog(client)
            busy = sum(client.zcard(keys.grant_set(k, m)) for k in IN_FLIGHT for m in merchants)
            jobs = [j for j in client.zrange("arq:queue", 0, -1) if not j.startswith("cron:")]
            calm = calm + 1 if not (waiting or backlog or busy or jobs) else 0
            if calm >= 3:
                return
            time.sleep(0.3)
        raise AssertionError(f"not quiet: webhooks {waiting}, inbox {backlog}, grants {busy}, "
                             f"jobs {jobs}")  # fmt: skip
    finally:
        client.close()


def _backlog(client: Redis) -> int:
    from service import inbox
    from service.keys import WEBHOOK_STREAM

    pending, unread, _ = client.eval(
        inbox.BACKLOG_SCRIPT.body, 1, WEBHOOK_STREAM, inbox.GROUP, "1000"
    )
    return int(pending) + int(unread)


def live_orders(cluster: Cluster, rng: random.Random, orders: int, *, kill_at: int) -> None:
    """Random order lives, delivered as a store delivers them, with the switches."""
    box = cluster.box
    for n in range(orders):
        merchant = STORES[n % len(STORES)]
        customer = rng.choice(CUSTOMERS)
        made = box.change_order(merchant, customer_id=customer, total=rng.randint(10, 900))
        order_id = made["order"]["id"]
        for _ in range(rng.randint(1, 4)):
            change: dict[str, Any] = {}
            pick = rng.random()
            if pick < 0.6:
                change["status"] = rng.choice(
                    ["completed", "completed", "canceled", "delivering", "delivered", "restored",
                     "in_progress"]
                )  # fmt: skip
            elif pick < 0.8:
                change["total"] = rng.randint(10, 900)
            else:
                change["customer_id"] = rng.choice(CUSTOMERS)
            webhook: dict[str, Any] = {}
            if rng.random() < 0.35:
                webhook["same_second"] = True
            if rng.random() < 0.1:
                webhook["twice"] = True
            if rng.random() < 0.15:
                webhook["hold"] = True
            elif rng.random() < 0.1:
                webhook["delay_s"] = rng.uniform(0.2, 1.5)
            box.change_order(merchant, order_id=order_id, webhook=webhook, **change)
        if n == kill_at:
            cluster.kill_a_worker(rng)
    for merchant in STORES:
        box.release_webhooks(merchant, order="shuffle", seed=rng.randint(0, 1000))


def assert_balances_right(cluster: Cluster) -> None:
    for merchant in STORES:
        assert balances(cluster.box, merchant) == deserved(cluster.box, merchant), merchant
    time.sleep(1.5)  # nothing arrives later (a double credit would)
    for merchant in STORES:
        assert balances(cluster.box, merchant) == deserved(cluster.box, merchant), merchant


class TestOrderLives:
    """Whatever order webhooks arrive in, every balance equals what the orders deserve."""

    @pytest.mark.timeout(180)  # ~45 s on a quiet machine: processes, a kill, a recovery
    def test_random_lives_through_two_workers_one_killed(self, store_cluster: Cluster) -> None:
        rng = random.Random(1313)
        store_cluster.start(workers=2)
        for merchant in STORES:
            install(store_cluster, merchant)
        live_orders(store_cluster, rng, 30, kill_at=12)
        quiet(store_cluster, STORES)
        assert_balances_right(store_cluster)
        asked = sum(store_cluster.box.stores[m].counters.get("orders_get", 0) for m in STORES)
        assert asked > 0, "same-second disagreements were never taken to Salla"


@pytest.mark.chaos
class TestOrderLivesChaos:
    """Many seeds, more orders, more kills (make chaos)."""

    @pytest.mark.parametrize("seed", range(6))
    def test_random_lives(self, store_cluster: Cluster, seed: int) -> None:
        rng = random.Random(seed)
        store_cluster.start(workers=2)
        for merchant in STORES:
            install(store_cluster, merchant)
        live_orders(store_cluster, rng, 60, kill_at=rng.randint(5, 50))
        quiet(store_cluster, STORES, timeout_s=240)
        assert_balances_right(store_cluster)


def reconcile(cluster: Cluster, merchant: int, *extra: str) -> str:
    """`salla-rewards orders reconcile`, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "service", "orders", "reconcile", "--merchant", str(merchant),
         *extra],
        cwd=ROOT_DIR, env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


class TestLostWebhooks:
    """Salla gives up after three re-sends: reconciliation recovers what never arrived."""

    def test_an_outage_is_recovered_by_reconciliation(self, store_cluster: Cluster) -> None:
        rng = random.Random(77)
        store_cluster.start(workers=1)
        merchant = STORES[0]
        install(store_cluster, merchant)
        box = store_cluster.box
        # Before the outage: some orders completed, their points sent.
        before = []
        for _ in range(6):
            made = box.change_order(merchant, customer_id=rng.choice(CUSTOMERS),
                                    total=rng.randint(50, 500))  # fmt: skip
            box.change_order(merchant, order_id=made["order"]["id"], status="completed")
            before.append(made["order"]["id"])
        quiet(store_cluster, (merchant,))
        # The outage: every webhook is lost. New orders complete, some old ones are canceled.
        box.set_outage(True)
        for _ in range(5):
            made = box.change_order(merchant, customer_id=rng.choice(CUSTOMERS),
                                    total=rng.randint(50, 500))  # fmt: skip
            box.change_order(merchant, order_id=made["order"]["id"], status="completed")
        for order_id in before[:3]:
            box.change_order(merchant, order_id=order_id, status="canceled")
        box.set_outage(False)
        quiet(store_cluster, (merchant,))
        assert balances(box, merchant) != deserved(box, merchant)  # the webhooks are gone
        listed_before = box.stores[merchant].counters.get("orders_list", 0)
        out = reconcile(store_cluster, merchant)
        assert "8 differed" in out, out  # 5 never seen, 3 canceled
        quiet(store_cluster, (merchant,))
        assert balances(box, merchant) == deserved(box, merchant)
        # One list page (11 orders) and one details call per changed order.
        assert box.stores[merchant].counters["orders_list"] - listed_before == 1
        again = reconcile(store_cluster, merchant)
        assert "0 differed" in again, again
        quiet(store_cluster, (merchant,))
        assert balances(box, merchant) == deserved(box, merchant)


HELD_RULES = """version: 1
rules:
  - id: purchase
    on: [order.created, order.updated, order.status.updated]
    when: order.completed_once
    points: order.total / 10
    type: plus
    reason: "order {order.reference_id}"
    hold_days: 0.00005
"""


class TestHeldGrants:
    """Points held for a return window are confirmed with Salla before they are sent."""

    def test_a_held_grant_whose_cancel_was_lost_is_never_paid(
        self, store_cluster: Cluster, tmp_path: Path
    ) -> None:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "purchase.yaml").write_text(HELD_RULES)
        store_cluster.env["RULES_PATH"] = str(rules)
        store_cluster.start(workers=1)
        merchant = STORES[0]
        install(store_cluster, merchant)
        box = store_cluster.box
        kept = box.change_order(merchant, customer_id=7001, total=300)["order"]["id"]
        box.change_order(merchant, order_id=kept, status="completed")
        lost = box.change_order(merchant, customer_id=7002, total=500)["order"]["id"]
        box.change_order(merchant, order_id=lost, status="completed")
        box.change_order(merchant, order_id=lost, status="canceled", webhook={"drop": True})
        time.sleep(5)  # the hold (about 4.3 s) ends
        quiet(store_cluster, (merchant,))
        assert balances(box, merchant) == {7001: 30}
        client = Redis.from_url(store_cluster.redis_server.url, decode_responses=True)
        try:
            states = {
                client.hget(k, "customer"): client.hget(k, "state")
                for k in client.scan_iter(keys.grant_prefix("*") + "*")
            }
        finally:
            client.close()
        assert states == {"7001": "sent", "7002": "netted"}
        assert box.stores[merchant].counters.get("orders_get", 0) >= 2
