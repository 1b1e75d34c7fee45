"""Operator commands as a user runs them: campaign, grants failed, grants retry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from service import keys
from service.sandbox.app import Sandbox
from tests.conftest import eventually, fixture_bytes, make_settings, running_worker
from tests.support.cli import CLI, cli, cli_interrupted
from tests.support.store import ORDER_CUSTOMER, ORDER_MERCHANT, balance, install


class TestCampaign:
    """A campaign goes through the ledger: batched, rate limited, never paid twice."""

    async def test_customers_file_batched_once_and_idempotent(
        self, redis: Redis, redis_url: str, web: Any, sandbox: tuple[str, Sandbox], tmp_path: Path
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        ids = tmp_path / "customers.csv"
        ids.write_text("id,name\n101,Ali\n102,Sara\n103,Omar\n")
        args = [
            "campaign",
            "--merchant",
            str(ORDER_MERCHANT),
            "--points",
            "25",
            "--reason",
            "Eid gift",
            "--customers",
            str(ids),
            "--channels",
            "sms",
        ]
        first = await cli(redis_url, *args)
        assert first.returncode == 0, first.stderr
        assert "3 new grant(s) queued" in first.stdout
        async with running_worker(make_settings(url), redis_url):
            await eventually(
                lambda: sum(balance(box, ORDER_MERCHANT, c) for c in (101, 102, 103)) == 75
            )
            again = await cli(redis_url, *args)
            assert "0 new grant(s) queued" in again.stdout
            await asyncio.sleep(0.3)
        gifts = [c for c in store.calls if c["reason"].startswith("Eid gift")]
        assert len(gifts) == 1 and sorted(gifts[0]["customers"]) == [101, 102, 103]

    async def test_all_customers_uses_select_all(
        self, redis: Redis, redis_url: str, web: Any, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT, customers=[7, 8, 9])
        result = await cli(
            redis_url,
            "campaign",
            "--merchant",
            str(ORDER_MERCHANT),
            "--points",
            "10",
            "--reason",
            "Welcome",
            "--all",
        )
        assert result.returncode == 0, result.stderr
        async with running_worker(make_settings(url), redis_url):
            await eventually(lambda: store.calls)
        assert store.calls[0]["select_all"] is True and store.calls[0]["customers"] == []
        assert [store.balances[c] for c in (7, 8, 9)] == [10, 10, 10]

    async def test_reset_sends_the_reset_flag_without_points(
        self, redis: Redis, redis_url: str, web: Any, sandbox: tuple[str, Sandbox], tmp_path: Path
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.balances.update({101: 40, 102: 7})
        ids = tmp_path / "ids.txt"
        ids.write_text("101\n102\n")
        args = [
            "campaign",
            "--merchant",
            str(ORDER_MERCHANT),
            "--reset",
            "--reason",
            "Season end",
            "--customers",
            str(ids),
        ]
        result = await cli(redis_url, *args)
        assert result.returncode == 0, result.stderr
        async with running_worker(make_settings(url), redis_url):
            await eventually(lambda: store.calls)
            assert "0 new grant(s)" in (await cli(redis_url, *args)).stdout
        [call] = store.calls
        assert call["reset_points"] is True and "points" not in call
        assert sorted(call["customers"]) == [101, 102]
        assert store.balances[101] == store.balances[102] == 0

    async def test_needs_exactly_one_audience(self, redis_url: str) -> None:
        result = await cli(
            redis_url, "campaign", "--merchant", "1", "--points", "5", "--reason", "x"
        )
        assert result.returncode == 2 and "exactly one of --all or --customers" in result.stderr
        both = await cli(
            redis_url,
            "campaign",
            "--merchant",
            "1",
            "--points",
            "5",
            "--reset",
            "--reason",
            "x",
            "--all",
        )
        assert both.returncode == 2 and "not both" in both.stderr


class TestGrantsCommands:
    """Failed grants are listed with their reason and can be sent again."""

    async def test_list_then_retry_after_the_cause_is_fixed(
        self, redis: Redis, redis_url: str, web: Any, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.invalid_customers = {ORDER_CUSTOMER}
        async with running_worker(make_settings(url), redis_url):
            web.post_webhook(fixture_bytes("order.status.updated.json"))
            await eventually(lambda: redis.zcard(keys.grant_set("failed", ORDER_MERCHANT)))
            listed = await cli(redis_url, "grants", "failed")
            assert listed.returncode == 0, listed.stderr
            assert (
                f"customer {ORDER_CUSTOMER}" in listed.stdout
                and "alert.invalid_fields" in listed.stdout
            )
            assert listed.stdout.strip().endswith("1 failed grant(s)")
            store.faults.invalid_customers = set()  # the merchant fixed the customer
            retried = await cli(redis_url, "grants", "retry", "--merchant", str(ORDER_MERCHANT))
            assert "1 grant(s) queued again" in retried.stdout
            await eventually(lambda: balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 15)
        after = await cli(redis_url, "grants", "failed")
        assert after.stdout.strip().endswith("0 failed grant(s)")

    async def test_unreachable_redis_is_a_clear_error(self) -> None:
        result = await cli("redis://127.0.0.1:9/0", "grants", "failed")
        assert result.returncode == 2  # a configuration mistake, as in serve and worker
        assert "cannot reach Redis at redis://127.0.0.1:9/0" in result.stderr


class TestInterrupted:
    async def test_campaign_ctrl_c_then_again_grants_each_customer_once(
        self, redis: Redis, redis_url: str, tmp_path: Path
    ) -> None:
        customers = 8_000
        ids = tmp_path / "customers.txt"
        ids.write_text("\n".join(str(100_000 + n) for n in range(customers)))
        args = [*CLI, "campaign", "--merchant", "7", "--points", "5", "--reason", "Eid"]
        args += ["--customers", str(ids), "--id", "eid"]
        ended = await cli_interrupted(
            redis_url, *args[len(CLI) :], once=lambda: redis.zcard(keys.grant_set("pending", 7))
        )
        assert ended.returncode == 130, ended.stderr
        assert "interrupted" in ended.stderr
        partly = await redis.zcard(keys.grant_set("pending", 7))
        assert 0 < partly < customers

        again = await cli(redis_url, *args[len(CLI) :])
        assert again.returncode == 0, again.stderr
        pending = await redis.zrange(keys.grant_set("pending", 7), 0, -1)
        assert len(pending) == customers  # each customer once, across both runs
