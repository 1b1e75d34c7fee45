"""The admin surface as operators use it: /admin/ over real HTTP, and the same CLI verbs."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service import keys, ledger
from service.app import create_app
from service.keys import WEBHOOK_STREAM
from service.sandbox.app import Sandbox
from tests.conftest import (
    ROOT_DIR,
    Service,
    eventually,
    fixture_bytes,
    inbox_empty,
    make_settings,
    running_worker,
)
from tests.support.cli import cli, cli_interrupted
from tests.support.kept import kept_webhooks
from tests.support.servers import serve_in_thread
from tests.support.store import ORDER_CUSTOMER, ORDER_MERCHANT, balance, install, with_merchant

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TODAY = dt.datetime.now(dt.UTC).date().isoformat()


@pytest.fixture
def admin_web(redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]) -> Iterator[Service]:
    settings = make_settings(sandbox[0], admin_token=ADMIN_TOKEN)
    with serve_in_thread(create_app(settings, redis_url)) as url:
        yield Service(url, settings)


def doubled_rules(tmp_path: Path) -> Path:
    """The example rules with purchases earning 1 point per 5 SAR instead of 10."""
    rules = tmp_path / "rules"
    shutil.copytree(ROOT_DIR / "rules", rules)
    shutil.copytree(ROOT_DIR / "examples", tmp_path / "examples")  # the rule files' tests
    purchase = rules / "purchase.yaml"
    text = purchase.read_text()
    purchase.write_text(text.replace("sar_per_point: 10 ", "sar_per_point: 5 ", 1))
    return rules


async def credited_order(web: Service, box: Sandbox, redis_url: str) -> None:
    """Salla's sample completed order, processed and paid (15 points)."""
    install(web, box, ORDER_MERCHANT)
    assert web.post_webhook(fixture_bytes("order.status.updated.json")).status_code == 200
    async with running_worker(web.settings, redis_url):
        await eventually(lambda: balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 15)


class TestAccess:
    def test_admin_routes_are_off_without_a_token(self, web: Service) -> None:
        answer = httpx.get(f"{web.url}/admin/stores/{ORDER_MERCHANT}", headers=AUTH)
        assert answer.status_code == 404

    @pytest.mark.parametrize(
        "headers",
        [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}, {"X-Token": "x"}],
    )
    def test_wrong_or_missing_token_is_401(self, admin_web: Service, headers: Any) -> None:
        answer = httpx.get(f"{admin_web.url}/admin/stores/{ORDER_MERCHANT}", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json()["status"] == "rejected"

    def test_short_token_refused_in_production(self) -> None:
        with pytest.raises(ValueError, match="ADMIN_TOKEN is shorter"):
            make_settings(admin_token="short")

    @pytest.mark.parametrize(
        "query",
        ["since=yesterday", "since=2026-13-01", "since=2026-11-02&until=2026-11-01", "format=xml"],
    )
    def test_bad_export_query_is_400(self, admin_web: Service, query: str) -> None:
        answer = httpx.get(f"{admin_web.url}/admin/export?{query}", headers=AUTH)
        assert answer.status_code == 400
        assert answer.json()["error"]


class TestViews:
    async def test_store_order_customer_and_export(
        self, admin_web: Service, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        _, box = sandbox
        await credited_order(admin_web, box, redis_url)
        base = f"{admin_web.url}/admin/stores/{ORDER_MERCHANT}"

        state = httpx.get(base, headers=AUTH).json()
        assert state["status"] == "authorized"
        expires = box.stores[ORDER_MERCHANT].access_expires_at
        valid_until = dt.datetime.fromisoformat(state["token"]["valid_until"]).timestamp()
        assert valid_until == pytest.approx(int(expires), abs=1)
        assert state["queue"]["pending"] == 0
        assert state["rate_limit"]["available"] < state["rate_limit"]["capacity"]
        assert state["failed_grants"] == []

        person = httpx.get(f"{base}/customers/{ORDER_CUSTOMER}", headers=AUTH).json()
        assert person["points_by_state"] == {"sent": 15}
        (grant,) = person["grants"]
        assert grant["rule"] == "purchase"
        assert grant["batch"]
        assert grant["sent_at"]
        assert grant["trace_id"]
        order_id = int(grant["scope"].removeprefix("order:"))

        order = httpx.get(f"{base}/orders/{order_id}", headers=AUTH).json()
        assert order["granted"] == 15
        (scope,) = order["scopes"]
        assert scope["rules"]["purchase"]["granted"] == 15
        assert scope["grants"][0]["grant_id"] == grant["grant_id"]
        assert httpx.get(f"{base}/orders/{order_id + 1}", headers=AUTH).status_code == 404

        jsonl = httpx.get(f"{admin_web.url}/admin/export?since={TODAY}", headers=AUTH)
        assert jsonl.headers["content-type"].startswith("application/x-ndjson")
        rows = [json.loads(line) for line in jsonl.text.splitlines()]
        assert [r["grant_id"] for r in rows] == [grant["grant_id"]]
        as_csv = httpx.get(
            f"{admin_web.url}/admin/export?format=csv&merchant={ORDER_MERCHANT}", headers=AUTH
        )
        (row,) = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert row["signed_points"] == "15"
        assert row["state"] == "sent"
        before = httpx.get(f"{admin_web.url}/admin/export?until=2020-01-01", headers=AUTH)
        assert before.status_code == 200
        assert before.text == ""
        other_store = httpx.get(f"{admin_web.url}/admin/export?merchant=1", headers=AUTH)
        assert other_store.text == ""

    async def test_failed_grants_listed_with_salla_error(
        self, admin_web: Service, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        _, box = sandbox
        store = install(admin_web, box, ORDER_MERCHANT)
        store.faults.invalid_customers = {ORDER_CUSTOMER}
        admin_web.post_webhook(fixture_bytes("order.status.updated.json"))
        base = f"{admin_web.url}/admin/stores/{ORDER_MERCHANT}"
        async with running_worker(admin_web.settings, redis_url):
            state = await eventually(
                lambda: (s := httpx.get(base, headers=AUTH).json())["failed_grants"] and s
            )
        assert state["queue"]["failed"] == 1
        (failed,) = state["failed_grants"]
        assert failed["customer"] == ORDER_CUSTOMER
        assert failed["state"] == "failed"
        assert failed["error"]


class TestReplay:
    async def test_dry_run_shows_the_difference_and_a_real_run_sends_only_it(
        self,
        admin_web: Service,
        redis: Redis,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
        tmp_path: Path,
    ) -> None:
        url, box = sandbox
        await credited_order(admin_web, box, redis_url)

        same = httpx.post(f"{admin_web.url}/admin/replay", headers=AUTH).text.splitlines()
        assert json.loads(same[-1])["summary"] == {
            "webhooks": 1,
            "changed": 0,
            "skipped": 0,
            "dry_run": True,
        }

        settings = make_settings(url, admin_token=ADMIN_TOKEN, rules_path=doubled_rules(tmp_path))
        with serve_in_thread(create_app(settings, redis_url)) as new_url:
            dry = httpx.post(f"{new_url}/admin/replay?since={TODAY}", headers=AUTH)
            *lines, summary = [json.loads(x) for x in dry.text.splitlines()]
            assert summary["summary"]["changed"] == 1
            (diff,) = lines[0]["diffs"]
            assert (diff["rule"], diff["granted_before"], diff["granted_after"]) == (
                "purchase",
                15,
                30,
            )
            assert await ledger.entry(redis, ORDER_MERCHANT, diff["scope"]) == {"purchase": 15}

            real = httpx.post(f"{new_url}/admin/replay?dry_run=false", headers=AUTH)
            assert json.loads(real.text.splitlines()[-1])["summary"]["changed"] == 1
            async with running_worker(settings, redis_url):
                await eventually(lambda: balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 30)
            again = httpx.post(f"{new_url}/admin/replay?dry_run=false", headers=AUTH)
            assert json.loads(again.text.splitlines()[-1])["summary"]["changed"] == 0
        assert balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 30

    async def test_app_events_are_not_kept(
        self, admin_web: Service, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        """app.store.authorize carries the store's tokens: it must not sit in the replay log."""
        _, box = sandbox
        await credited_order(admin_web, box, redis_url)
        kept = await kept_webhooks(redis)
        assert [fields["event"] for _, fields in kept] == ["order.status.updated"]
        token = box.stores[ORDER_MERCHANT].access_token
        assert all(token not in json.dumps(f, default=bytes.decode) for _, f in kept)


class TestCli:
    async def test_same_verbs_as_http(
        self,
        web: Service,
        redis: Redis,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
        tmp_path: Path,
    ) -> None:
        _, box = sandbox
        await credited_order(web, box, redis_url)
        m = str(ORDER_MERCHANT)

        store = await cli(redis_url, "admin", "store", m)
        assert store.returncode == 0, store.stderr
        assert f"store {m}: authorized" in store.stdout
        assert "token valid until" in store.stdout

        person = await cli(redis_url, "admin", "customer", m, str(ORDER_CUSTOMER), "--json")
        (grant,) = json.loads(person.stdout)["grants"]
        order_id = grant["scope"].removeprefix("order:")
        order = await cli(redis_url, "admin", "order", m, order_id)
        assert order.returncode == 0, order.stderr
        assert "+15 points granted" in order.stdout
        assert grant["batch"] in order.stdout
        missing = await cli(redis_url, "admin", "order", m, "1")
        assert missing.returncode == 1

        out = tmp_path / "ledger.csv"
        export = await cli(redis_url, "admin", "export", "--format", "csv", "-o", str(out))
        assert export.returncode == 0, export.stderr
        assert "1 grant(s) exported" in export.stderr
        (row,) = list(csv.DictReader(io.StringIO(out.read_text())))
        assert row["grant_id"] == grant["grant_id"]
        assert not out.with_name("ledger.csv.partial").exists()

        bad = await cli(redis_url, "admin", "export", "--since", "last week")
        assert bad.returncode == 2
        assert "not a date" in bad.stderr

    async def test_replay_interrupted_then_finished_pays_once(
        self,
        web: Service,
        redis: Redis,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
        tmp_path: Path,
    ) -> None:
        """Ctrl-C in the middle of a real replay, then the same command again: each order's
        difference is queued exactly once."""
        _, box = sandbox
        await credited_order(web, box, redis_url)
        (_, first), *_ = await kept_webhooks(redis)
        # Many more completed orders, as if processed under the old rules (15 points each).
        template = json.loads(first["body"])
        orders = 1000
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(orders):
                doc = json.loads(json.dumps(template))
                doc["data"]["order"]["id"] = 10_000 + n
                doc["data"]["id"] = 10_000 + n
                pipe.xadd(
                    WEBHOOK_STREAM,
                    {
                        "merchant": ORDER_MERCHANT,
                        "event": "order.status.updated",
                        "delivery": f"d{n}",
                        "trace_id": "t",
                        "body": json.dumps(doc),
                    },
                )
            await pipe.execute()
        env = {"RULES_PATH": str(doubled_rules(tmp_path))}
        args = ["admin", "replay", "--apply"]
        pending_key = keys.grant_set("pending", ORDER_MERCHANT)
        ended = await cli_interrupted(
            redis_url, *args, once=lambda: redis.zcard(pending_key), env=env
        )  # Ctrl-C once it has applied something
        assert ended.returncode == 130, ended.stderr
        assert "interrupted after" in ended.stderr
        partly = await redis.zcard(keys.grant_set("pending", ORDER_MERCHANT))
        assert 0 < partly < orders + 1

        rest = await cli(redis_url, *args, env=env)
        assert rest.returncode == 0, rest.stderr
        pending = await ledger.grants_in(redis, "pending", ORDER_MERCHANT)
        # First-time orders get their 30 (new under the new rules); the paid one gets +15.
        assert len(pending) == orders + 1
        assert sum(g.points for g in pending) == orders * 30 + 15
        assert len({g.scope for g in pending}) == orders + 1
        again = await cli(redis_url, *args, env=env)
        assert "0 differ" in again.stderr


class TestRetention:
    async def test_old_webhooks_are_trimmed_and_zero_keeps_none(
        self, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, box = sandbox
        two_days_ago_ms = int((dt.datetime.now(dt.UTC).timestamp() - 2 * 86400) * 1000)
        await redis.xadd(WEBHOOK_STREAM, {"event": "old"}, id=f"{two_days_ago_ms}-0")
        settings = make_settings(url, webhook_retention_days=1)
        with serve_in_thread(create_app(settings, redis_url)) as web_url:
            web = Service(web_url, settings)
            await credited_order(web, box, redis_url)
        kept = await kept_webhooks(redis)
        assert [fields["event"] for _, fields in kept] == ["order.status.updated"]

        await redis.delete(WEBHOOK_STREAM)
        none = make_settings(url, webhook_retention_days=0)
        with serve_in_thread(create_app(none, redis_url)) as web_url:
            web = Service(web_url, none)
            web.post_webhook(
                with_merchant(
                    "order.status.updated.json", ORDER_MERCHANT, data__id=7, data__order__id=7
                )
            )
            async with running_worker(none, redis_url):
                await eventually(lambda: balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 30)
                # The inbox held it until it was processed, and keeps nothing after that.
                await eventually(lambda: inbox_empty(redis))
        assert await redis.xlen(WEBHOOK_STREAM) == 0


class TestExportInterrupted:
    async def test_ctrl_c_leaves_no_file(
        self, redis: Redis, redis_url: str, tmp_path: Path
    ) -> None:
        grants = 50_000
        now = ledger.now_ms()
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(grants):
                grant = ledger.Grant(
                    id=f"1-g{n}", merchant=1, customer=n, points=5, type="plus", reason="r",
                    channels=(), scope=f"order:{n}", rule="purchase", created_ms=now,
                )  # fmt: skip
                pipe.hset(keys.grant(grant.id), mapping=grant.to_redis())
                pipe.zadd(keys.grant_log(keys.index_shard(grant.merchant)), {grant.id: now})
            await pipe.execute()
        out = tmp_path / "ledger.jsonl"
        partial = tmp_path / "ledger.jsonl.partial"
        ended = await cli_interrupted(
            redis_url,
            *["admin", "export", "-o", str(out)],
            once=lambda: partial.exists() and partial.stat().st_size > 0,
        )
        assert ended.returncode == 130, ended.stderr
        assert "interrupted: no file was written" in ended.stderr
        assert not out.exists()
        assert not partial.exists()
