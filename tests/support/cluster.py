"""A real cluster for end-to-end tests: Redis, the sandbox, web and worker processes."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from redis import Redis, RedisCluster

from service import inbox, keys
from service.embedded import EmbeddedRedis
from service.sandbox.app import Sandbox
from service.webhooks import signed_headers
from tests.conftest import ROOT_DIR, SECRET, fixture_json
from tests.support.servers import free_port, wait_until

MERCHANT = 555000111
IN_FLIGHT = ("pending", "claimed", "parked", "unknown")


class Cluster:
    """Redis, the sandbox, one web process and N worker processes, all real.

    `state_cluster` (a Redis Cluster's seed URL): the state lives there (`REDIS_CLUSTER=true`,
    three inbox shards) and `redis` is only arq's queue (`QUEUE_REDIS_URL`)."""

    def __init__(
        self,
        tmp: Path,
        sandbox_url: str,
        box: Sandbox,
        redis: EmbeddedRedis,
        *,
        state_cluster: str | None = None,
        **env: str,
    ) -> None:
        self.tmp, self.sandbox_url, self.box, self.redis_server = tmp, sandbox_url, box, redis
        self.state_cluster = state_cluster
        self.web_port = free_port()
        self.workers: list[subprocess.Popen[bytes]] = []
        self.web: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ, "REDIS_URL": redis.url, "SALLA_WEBHOOK_SECRET": SECRET,
            "SALLA_API_BASE": sandbox_url, "SALLA_OAUTH_TOKEN_URL": f"{sandbox_url}/oauth2/token",
            "LOG_FORMAT": "json", "BATCH_WINDOW_S": "0.1", "SALLA_TIMEOUT_S": "1",
            "CLAIM_TIMEOUT_S": "2", "RECONCILE_AFTER_S": "0.3", "RETRY_BASE_S": "0.1",
            "RETRY_CAP_S": "1", "JOB_TIMEOUT_S": "8", "MAX_CUSTOMERS_PER_CALL": "5",
            "WORKER_METRICS_PORT": "0", **env,
        }  # fmt: skip
        if state_cluster is not None:
            self.env.update(REDIS_URL=state_cluster, REDIS_CLUSTER="true", INBOX_SHARDS="3",
                            QUEUE_REDIS_URL=redis.url)  # fmt: skip
        self.sent_events = 0
        #: Send a delivery again after a non-200, as Salla does, instead of failing the test
        #: (a failover answers 503 until the web's writer finds the new master).
        self.resend = False
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
        ready = f"http://127.0.0.1:{self.web_port}/readyz"
        wait_until(lambda: httpx.get(ready).status_code == 200, timeout_s=90)  # a loaded CI box

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
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{self.web_port}/webhooks/salla",
                                    content=body, headers=signed_headers(body, SECRET),
                                    timeout=10)  # fmt: skip
            except httpx.TransportError:
                if not self.resend or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            if answer.status_code == 200 or not self.resend or time.monotonic() > deadline:
                break
            time.sleep(0.5)
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

    def state_client(self) -> Any:
        """A client of the state store: the Redis Cluster's, or the one Redis's."""
        if self.state_cluster is not None:
            return RedisCluster.from_url(self.state_cluster, decode_responses=True)
        return Redis.from_url(self.redis_server.url, decode_responses=True)


def inbox_backlog(client: Any, shards: int) -> int:
    total = 0
    for stream in keys.webhook_streams(shards):
        pending, unread, _ = client.eval(inbox.BACKLOG_SCRIPT.body, 1, stream, inbox.GROUP, "1000")
        total += int(pending) + int(unread)
    return total


def settled(cluster: Cluster, timeout_s: float = 90) -> dict[str, Any]:
    """Wait until no grant is in flight; return the ledger's view per customer."""
    client = cluster.state_client()
    queue = Redis.from_url(cluster.redis_server.url, decode_responses=True)
    shards = int(cluster.env.get("INBOX_SHARDS", "1"))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            cluster.restart_dead_workers()
            accepted = sum(
                1
                for n in range(shards)
                for _ in client.scan_iter(keys.seen_prefix(n, shards) + "*")
            )
            unprocessed = inbox_backlog(client, shards)
            busy = sum(client.zcard(keys.grant_set(kind, MERCHANT)) for kind in IN_FLIGHT)
            queued = queue.zcard("arq:queue")
            if accepted >= cluster.sent_events and unprocessed == 0 and busy == 0 and queued <= 4:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled: accepted {accepted}/{cluster.sent_events}, "
                                     f"unprocessed {unprocessed}, in flight {busy}, "
                                     f"queued {queued}")  # fmt: skip
            time.sleep(0.2)
        sent: dict[int, int] = {}
        states: dict[str, int] = {}
        for key in client.scan_iter(keys.grant_prefix("*") + "*"):
            grant = client.hgetall(key)
            states[grant["state"]] = states.get(grant["state"], 0) + 1
            if grant["state"] == "sent":
                sign = 1 if grant["type"] == "plus" else -1
                customer = int(grant["customer"])
                sent[customer] = sent.get(customer, 0) + sign * int(grant["points"])
        granted: dict[int, int] = {}
        for key in client.scan_iter(keys.entry(MERCHANT, "order:*")):
            for name, value in client.hgetall(key).items():
                if name.startswith("r:"):
                    for customer, points in json.loads(value)["granted"].items():
                        granted[int(customer)] = granted.get(int(customer), 0) + points
        return {"sent": sent, "granted": granted, "states": states}
    finally:
        client.close()
        queue.close()
