"""Metrics and health as an operator reads them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service import keys, metrics
from service.sandbox.app import Sandbox
from service.worker import sweep
from tests.conftest import ROOT_DIR, eventually, fixture_bytes, make_settings, running_worker
from tests.support.store import ORDER_CUSTOMER, ORDER_MERCHANT, balance, install


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class TestMetrics:
    """Counters move with the work; gauges show each store's queue."""

    def test_web_exposes_prometheus_text(self, web: Any) -> None:
        before = sample(
            "salla_rewards_webhooks_total", salla_event="order.status.updated", outcome="accepted"
        )
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        web.post_webhook(fixture_bytes("order.status.updated.json"), secret="wrong")
        text = httpx.get(f"{web.url}/metrics").text
        assert "# TYPE salla_rewards_webhooks_total counter" in text
        assert (
            sample(
                "salla_rewards_webhooks_total",
                salla_event="order.status.updated",
                outcome="accepted",
            )
            == before + 1
        )
        assert (
            sample("salla_rewards_webhooks_total", salla_event="unknown", outcome="rejected_401")
            >= 1
        )

    async def test_worker_counts_calls_and_grants(
        self, web: Any, worker: Any, sandbox: tuple[str, Sandbox]
    ) -> None:
        _, box = sandbox
        calls = sample("salla_rewards_salla_calls_total", status="201")
        sent = sample("salla_rewards_grants_total", rule="purchase", state="sent")
        install(web, box, ORDER_MERCHANT)
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 15)
        await eventually(
            lambda: sample("salla_rewards_grants_total", rule="purchase", state="sent") == sent + 1
        )
        assert sample("salla_rewards_salla_calls_total", status="201") == calls + 1
        assert sample("salla_rewards_salla_call_seconds_count") >= 1

    async def test_sweep_sets_store_gauges(
        self, redis: Redis, redis_url: str, web: Any, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, _ = sandbox
        web.post_webhook(fixture_bytes("order.status.updated.json"))  # no token: it will park
        async with running_worker(make_settings(url), redis_url) as worker:
            await eventually(lambda: redis.zcard(keys.grant_set("parked", ORDER_MERCHANT)))
            await redis.sadd(
                keys.stores_pending(keys.index_shard(ORDER_MERCHANT)), str(ORDER_MERCHANT)
            )
            await sweep(worker.ctx)
        assert (
            sample("salla_rewards_grants_needing_attention", kind="parked") == 1
        )  # no store label: 50,000 stores would be 50,000 series
        assert sample("salla_rewards_pending_grants") == 0


class TestWorkerCheck:
    """`worker --check` says whether any worker reported in recently."""

    async def check(self, redis_url: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "service", "worker", "--check"],
            capture_output=True,
            text=True,
            cwd=ROOT_DIR,
            timeout=30,
            env={**os.environ, "REDIS_URL": redis_url},
        )

    async def test_fails_without_workers_and_passes_with_one(
        self, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        assert (await self.check(redis_url)).returncode == 1
        async with running_worker(make_settings(sandbox[0]), redis_url):
            await eventually(lambda: redis.exists("arq:queue:health-check"))
            result = await self.check(redis_url)
            assert result.returncode == 0 and result.stdout.startswith("ok")


class TestCustomerIdsInLogs:
    """A call's log line counts its customers; the ids themselves appear only at DEBUG."""

    @pytest.mark.parametrize("level", ["INFO", "DEBUG"])
    async def test_ids_only_at_debug(
        self,
        level: str,
        web: Any,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        url, box = sandbox
        install(web, box, ORDER_MERCHANT)
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        async with running_worker(make_settings(url, log_level=level), redis_url):
            await eventually(lambda: balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 15)
        lines = [
            json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"
        ]
        (sent,) = [line for line in lines if line["event"] == "batch_sent"]
        assert sent["customer_ids"] == 1
        listed = [line for line in lines if line["event"] == "batch_customers"]
        if level == "DEBUG":
            assert [line["customer_id_list"] for line in listed] == [[ORDER_CUSTOMER]]
            assert listed[0]["batch_id"] == sent["batch_id"]
        else:
            assert listed == []
