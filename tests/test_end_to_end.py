"""Signed Salla webhooks in, points at the sandbox out: web + worker + sandbox, all real."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
from redis.asyncio import Redis

from service import keys, ledger
from service.app import create_app
from service.sandbox.app import Sandbox, request_schema
from tests.conftest import (
    Service,
    eventually,
    fixture_bytes,
    inbox_empty,
    make_settings,
    running_worker,
)
from tests.support.servers import serve_in_thread
from tests.support.settled import settles_at
from tests.support.store import (
    ORDER_CUSTOMER,
    ORDER_MERCHANT,
    authorize_body,
    balance,
    install,
    post_reviews,
    with_merchant,
)


class TestPublishedSamples:
    """Salla's published samples, signed with both strategies, credit the right customer."""

    async def test_completed_order_credits_15_points(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        assert web.post_webhook(fixture_bytes("order.status.updated.json")).status_code == 200
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)
        history = httpx.get(
            f"{url}/customers/loyalty/points",
            params={"customer_id": ORDER_CUSTOMER},
            headers={"Authorization": f"Bearer {store.access_token}"},
        ).json()
        assert history["data"][0]["points"] == 15
        assert history["data"][0]["notes"].startswith("نقاط الطلب رقم 42264 #")

    async def test_review_sample_with_token_strategy(
        self, redis: Redis, redis_url: str, worker: Any, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, box = sandbox
        token_settings = make_settings(url, salla_webhook_strategy="token")
        with serve_in_thread(create_app(token_settings, redis_url)) as web_url:
            web = Service(web_url, token_settings)
            store = box.add_store(1029864349)
            assert (
                web.post_webhook(authorize_body(1029864349, store), strategy="token").status_code
                == 200
            )
            assert (
                web.post_webhook(fixture_bytes("review.added.json"), strategy="token").status_code
                == 200
            )
            await settles_at(box, redis, 1029864349, 2107468057, 50)

    async def test_order_under_review_credits_nothing(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        install(web, box, 1305146709)
        web.post_webhook(fixture_bytes("order.created.json"))
        await eventually(lambda: inbox_empty(redis))
        assert await redis.exists(keys.entry(1305146709, "order:2116149737"))
        assert box.stores[1305146709].calls == []

    async def test_sent_bodies_validate_against_the_spec(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox]
    ) -> None:
        _, box = sandbox
        install(web, box, ORDER_MERCHANT)
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: box.stores[ORDER_MERCHANT].calls)
        validator = jsonschema.Draft202012Validator(request_schema())
        for call in box.stores[ORDER_MERCHANT].calls:
            validator.validate(call)
            assert set(call) == {"points", "type", "reason", "channel_send", "customers"}


class TestExactlyOnce:
    """Repeats, reversals and batching."""

    async def test_same_webhook_three_times_credits_once(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        install(web, box, ORDER_MERCHANT)
        for _ in range(3):
            assert web.post_webhook(fixture_bytes("order.status.updated.json")).status_code == 200
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)
        await eventually(lambda: _no_pending(redis, ORDER_MERCHANT))
        assert len(box.stores[ORDER_MERCHANT].calls) == 1

    async def test_reprocessed_event_with_new_bytes_credits_once(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        """A re-send whose bytes differ (new created_at) is a new delivery; the ledger holds."""
        _, box = sandbox
        install(web, box, ORDER_MERCHANT)
        for stamp in ("Wed Aug 17 2022 23:59:38 GMT+0300", "Wed Aug 17 2022 23:59:39 GMT+0300"):
            web.post_webhook(
                with_merchant("order.status.updated.json", ORDER_MERCHANT, created_at=stamp)
            )
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)
        await eventually(lambda: _no_pending(redis, ORDER_MERCHANT))
        assert balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 15

    async def test_cancel_after_completion_takes_the_points_back(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        merchant, customer = 1305146709, 225167971
        install(web, box, merchant)
        web.post_webhook(
            with_merchant("order.created.json", merchant, data__status__slug="completed")
        )
        await eventually(lambda: balance(box, merchant, customer) == 19)  # 196 SAR
        web.post_webhook(fixture_bytes("order.cancelled.derived.json"))
        await eventually(lambda: len(box.stores[merchant].calls) == 2)
        assert balance(box, merchant, customer) == 0
        assert box.stores[merchant].calls[1]["type"] == "minus"
        assert box.stores[merchant].calls[1]["reason"].startswith("Reversal: ")

    async def test_grants_sharing_points_and_reason_share_one_call(
        self, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox], web: Service
    ) -> None:
        _, box = sandbox
        install(web, box, ORDER_MERCHANT)
        post_reviews(web, ORDER_MERCHANT, (11, 12, 13))
        # Start the worker only now, so all three grants wait in the same batch window.
        settings = make_settings(sandbox[0], batch_window_s=0.5)
        async with running_worker(settings, redis_url):
            await eventually(
                lambda: sum(balance(box, ORDER_MERCHANT, c) for c in (11, 12, 13)) == 150
            )
        review_calls = [c for c in box.stores[ORDER_MERCHANT].calls if c["points"] == 50]
        assert len(review_calls) == 1 and sorted(review_calls[0]["customers"]) == [11, 12, 13]


async def _no_pending(redis: Redis, merchant: int) -> bool:
    pending = await redis.zcard(keys.grant_set("pending", merchant))
    claimed = await redis.zcard(keys.grant_set("claimed", merchant))
    return pending == 0 and claimed == 0


class TestStoreLifecycle:
    """Tokens come and go with the app's lifecycle events; grants wait, never drop."""

    async def test_grants_wait_for_a_token_then_go(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: redis.zcard(keys.grant_set("parked", ORDER_MERCHANT)))
        store = box.add_store(ORDER_MERCHANT)
        web.post_webhook(authorize_body(ORDER_MERCHANT, store))
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)

    async def test_authorize_racing_a_flush_that_parks_does_not_strand_grants(
        self, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        """The flush read "no token", then authorize stored one and unparked (nothing yet)."""
        from service import queue, tokens
        from service.delivery.deps import Deps
        from service.delivery.flush import park_unless_authorized
        from service.rules.engine import Outcome
        from service.salla import SallaClient, TokenSet

        url, box = sandbox
        outcome = Outcome("r", "v", "grant", 5, "x", (), "t", scope="order:1")
        await ledger.apply_outcomes(redis, ORDER_MERCHANT, [outcome], customer=9)
        claimed = (
            await ledger.claim_due(
                redis, ORDER_MERCHANT, limit=10, claim_timeout_ms=60_000, token="t"
            )
        ).grants
        store = box.add_store(ORDER_MERCHANT)
        await tokens.save(redis, ORDER_MERCHANT, TokenSet(store.access_token, "r", 0))
        await ledger.unpark(redis, ORDER_MERCHANT)  # the authorize handler ran first
        pool = await queue.connect(redis_url)
        async with httpx.AsyncClient() as http:
            deps = Deps(make_settings(url), redis, pool, SallaClient(http, url))
            await park_unless_authorized(deps, ORDER_MERCHANT, claimed, "no token", None)
        await pool.aclose()
        assert await redis.zcard(keys.grant_set("parked", ORDER_MERCHANT)) == 0
        assert await ledger.due_count(redis, ORDER_MERCHANT) == 1

    async def test_uninstall_stops_deliveries(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        install(web, box, ORDER_MERCHANT)  # authorized at 2022-12-31 12:31:25
        await eventually(lambda: _store_status(redis, ORDER_MERCHANT, "authorized"))
        uninstall = with_merchant(
            "app.uninstalled.json", ORDER_MERCHANT, created_at="2023-01-05 10:00:00"
        )
        assert web.post_webhook(uninstall).json()["status"] == "accepted"
        await eventually(lambda: _store_status(redis, ORDER_MERCHANT, "uninstalled"))
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: redis.zcard(keys.grant_set("parked", ORDER_MERCHANT)))
        assert box.stores[ORDER_MERCHANT].calls == []
        assert not await redis.hget(keys.store(ORDER_MERCHANT), "access_token")

    async def test_an_old_authorize_arriving_after_uninstall_is_ignored(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = box.add_store(ORDER_MERCHANT)
        web.post_webhook(
            with_merchant("app.uninstalled.json", ORDER_MERCHANT, created_at="2023-01-05 10:00:00")
        )
        await eventually(lambda: _store_status(redis, ORDER_MERCHANT, "uninstalled"))
        web.post_webhook(authorize_body(ORDER_MERCHANT, store))  # sent 2022-12-31: older
        await eventually(
            lambda: redis.exists(
                keys.SEEN_PREFIX + f"{ORDER_MERCHANT}:app.store.authorize:"
                f"{_digest(authorize_body(ORDER_MERCHANT, store))}"
            )
        )
        assert await redis.hget(keys.store(ORDER_MERCHANT), "status") == "uninstalled"

    async def test_expired_token_is_refreshed_once_and_the_grant_sent(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.access_expires_at = 0  # Salla now answers 401 to the stored token
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)
        assert store.counters.get("refreshed") == 1


def _digest(body: bytes) -> str:
    import hashlib

    return hashlib.sha256(body).hexdigest()[:32]


async def _store_status(redis: Redis, merchant: int, status: str) -> bool:
    return bool(await redis.hget(keys.store(merchant), "status") == status)


async def _all_grants(redis: Redis) -> list[ledger.Grant]:
    ids = [key.rsplit(":", 1)[-1] async for key in redis.scan_iter(keys.grant_prefix("*") + "*")]
    return await ledger.load(redis, ids)


async def _grant_states(redis: Redis, merchant: int) -> list[str]:
    return sorted(g.state for g in await _all_grants(redis) if g.merchant == merchant)


def states_are(redis: Redis, merchant: int, expected: list[str]) -> Any:
    """A check for `eventually`: the store's grants are in exactly these states."""

    async def check() -> bool:
        return await _grant_states(redis, merchant) == expected

    return check


class TestRateLimits:
    """Our shared bucket keeps calls inside the store's limit: Salla never answers 429."""

    async def test_backlog_drains_within_the_limit(
        self, redis: Redis, redis_url: str, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        from service.rules.engine import Outcome

        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT, rate_limit=4, rate_window_s=1)
        for n in range(12):  # distinct points: twelve separate calls against a 4/s bucket
            outcome = Outcome("r", "v", "grant", 1 + n, "x", (), "t", scope=f"order:{n}")
            await ledger.apply_outcomes(redis, ORDER_MERCHANT, [outcome], customer=900 + n)
        settings = make_settings(url, rate_limit_requests=4, rate_limit_window_s=1.0)
        async with running_worker(settings, redis_url):
            await eventually(
                lambda: sum(store.balances.values()) == sum(range(1, 13)), timeout_s=20
            )
        assert len(store.calls) == 12
        assert store.counters.get("rate_limited", 0) == 0

    async def test_one_flush_sends_a_bounded_number_of_calls(
        self, redis: Redis, redis_url: str, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        from service.delivery.deps import Deps
        from service.delivery.flush import flush
        from service.rules.engine import Outcome

        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        settings = make_settings(url, batches_per_flush=3)
        for n in range(10):  # distinct points: ten calls
            outcome = Outcome("r", "v", "grant", 1 + n, "x", (), "t", scope=f"order:{n}")
            await ledger.apply_outcomes(redis, ORDER_MERCHANT, [outcome], customer=700 + n)
        from service import queue, tokens
        from service.salla import SallaClient, TokenSet

        await tokens.save(
            redis, ORDER_MERCHANT, TokenSet(store.access_token, store.refresh_token, 0)
        )
        pool = await queue.connect(redis_url)
        async with httpx.AsyncClient() as http:
            deps = Deps(settings, redis, pool, SallaClient(http, url))
            counts = await flush(deps, ORDER_MERCHANT)
        await pool.aclose()
        assert counts["batches"] == 3 and len(store.calls) == 3
        assert await redis.zcard(keys.grant_set("pending", ORDER_MERCHANT)) == 7

    async def test_a_throttled_backlog_does_not_starve_another_store(
        self, redis: Redis, redis_url: str, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        from service.rules.engine import Outcome

        url, box = sandbox
        install(web, box, ORDER_MERCHANT)
        other = install(web, box, 1029864349)
        for n in range(300):
            outcome = Outcome("r", "v", "grant", 1 + n, "x", (), "t", scope=f"order:{n}")
            await ledger.apply_outcomes(redis, ORDER_MERCHANT, [outcome], customer=800 + n)
        # Store ORDER_MERCHANT may send 5 calls per 10 minutes: its backlog cannot drain.
        settings = make_settings(url, rate_limit_requests=5, rate_limit_window_s=600)
        async with running_worker(settings, redis_url):
            web.post_webhook(fixture_bytes("review.added.json"))
            await settles_at(box, redis, 1029864349, 2107468057, 50)
        assert await redis.zcard(keys.grant_set("pending", ORDER_MERCHANT)) >= 290
        assert other.counters.get("applied") == 1

    async def test_scheduled_refresh_renews_tokens_before_expiry(
        self, redis: Redis, redis_url: str, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        from service.delivery.refresh import refresh_expiring_tokens
        from service.worker_resources import of

        url, box = sandbox
        store = box.add_store(ORDER_MERCHANT, access_ttl_s=3600)  # expires within the day
        web.post_webhook(authorize_body(ORDER_MERCHANT, store))
        settings = make_settings(url)
        async with running_worker(settings, redis_url) as worker:
            await eventually(lambda: redis.hget(keys.store(ORDER_MERCHANT), "access_token"))
            deps = of(worker.ctx).delivery
            assert await refresh_expiring_tokens(deps) == 1
            assert await refresh_expiring_tokens(deps) == 0  # now valid for 14 days
        assert store.counters.get("refreshed") == 1
        assert await redis.hget(keys.store(ORDER_MERCHANT), "access_token") == store.access_token


class TestSallaFaults:
    """A Salla outage loses nothing; an unknown outcome is never resent blindly."""

    async def test_503_then_success_credits_once(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.statuses = [503, 503]
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)
        assert store.counters.get("fault_503") == 2
        assert len(store.calls) == 1

    async def test_429_is_retried_after_retry_after(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.statuses = [429]
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15, timeout_s=15)
        assert store.counters.get("fault_429") == 1

    async def test_dropped_connection_after_apply_is_reconciled_not_resent(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.drop_after_apply = 1
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: store.counters.get("dropped_after_apply"))
        await eventually(states_are(redis, ORDER_MERCHANT, ["sent"]))
        [grant] = await _all_grants(redis)
        assert grant.error == "reconciled: found in the points history"
        assert balance(box, ORDER_MERCHANT, ORDER_CUSTOMER) == 15
        assert len(store.calls) == 1

    async def test_dropped_connection_before_apply_is_reconciled_and_sent_once(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.drop_before_apply = 1
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await settles_at(box, redis, ORDER_MERCHANT, ORDER_CUSTOMER, 15)
        await eventually(states_are(redis, ORDER_MERCHANT, ["sent"]))
        assert store.counters.get("dropped_before_apply") == 1
        assert store.counters.get("applied") == 1
        assert store.calls[0]["reason"].startswith("نقاط الطلب رقم 42264 #")

    async def test_unreadable_history_sends_the_grant_to_review(
        self, redis: Redis, redis_url: str, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.drop_after_apply = 1
        settings = make_settings(url, reconcile_max_attempts=2)
        async with running_worker(settings, redis_url):
            web.post_webhook(fixture_bytes("order.status.updated.json"))
            await eventually(lambda: store.counters.get("dropped_after_apply"))
            store.faults.statuses = [503] * 10  # the history cannot be read
            await eventually(
                lambda: redis.zcard(keys.grant_set("review", ORDER_MERCHANT)), timeout_s=30
            )
        [grant] = await ledger.grants_in(redis, "review", ORDER_MERCHANT)
        assert grant.state == "review" and "history unreadable 2 times" in grant.error
        assert len(store.calls) == 1

    async def test_422_isolates_the_refused_customer_and_sends_the_rest(
        self, redis: Redis, redis_url: str, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        url, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.invalid_customers = {13}
        post_reviews(web, ORDER_MERCHANT, (11, 12, 13, 14))
        async with running_worker(make_settings(url, batch_window_s=0.5), redis_url):
            await eventually(lambda: redis.zcard(keys.grant_set("failed", ORDER_MERCHANT)))
            await eventually(
                lambda: sum(balance(box, ORDER_MERCHANT, c) for c in (11, 12, 14)) == 150
            )
        [failed] = await ledger.grants_in(redis, "failed", ORDER_MERCHANT)
        assert failed.customer == 13 and "alert.invalid_fields" in failed.error
        assert balance(box, ORDER_MERCHANT, 13) == 0

    async def test_422_records_the_grant_as_failed_with_salla_message(
        self, web: Service, worker: Any, sandbox: tuple[str, Sandbox], redis: Redis
    ) -> None:
        _, box = sandbox
        store = install(web, box, ORDER_MERCHANT)
        store.faults.invalid_customers = {ORDER_CUSTOMER}
        web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: redis.zcard(keys.grant_set("failed", ORDER_MERCHANT)))
        [grant] = await ledger.grants_in(redis, "failed", ORDER_MERCHANT)
        assert "alert.invalid_fields" in grant.error and str(ORDER_CUSTOMER) in grant.error
        assert store.calls == []


class TestInboxShards:
    """`INBOX_SHARDS=3`: each store's webhooks go to its shard's stream (with their seen
    marks), workers read every shard, and the backlog, a duplicate and a replay's count see all
    of them."""

    async def test_three_stores_on_three_shards_each_credited_once(
        self, redis: Redis, redis_url: str, sandbox: tuple[str, Sandbox]
    ) -> None:
        from service.admin.replay import count_webhooks

        url, box = sandbox
        shard_settings = make_settings(url, inbox_shards=3)
        merchants = [ORDER_MERCHANT + n for n in range(3)]  # one per shard: merchant mod 3
        assert sorted(keys.inbox_shard(m, 3) for m in merchants) == [0, 1, 2]
        with serve_in_thread(create_app(shard_settings, redis_url)) as web_url:
            web = Service(web_url, shard_settings)
            async with running_worker(shard_settings, redis_url):
                for merchant in merchants:
                    install(web, box, merchant)
                    body = with_merchant("order.status.updated.json", merchant)
                    assert web.post_webhook(body).status_code == 200
                    assert web.post_webhook(body).json()["status"] == "duplicate"
                for merchant in merchants:
                    await settles_at(box, redis, merchant, ORDER_CUSTOMER, 15)
                for merchant in merchants:
                    stream = keys.webhook_stream(keys.inbox_shard(merchant, 3), 3)
                    entries = await redis.execute_command(  # bodies are binary
                        "XRANGE", stream, "-", "+", NEVER_DECODE=True
                    )
                    stored = [int(fields[b"merchant"]) for _, fields in entries]
                    assert stored == [merchant], stream  # the order (app events: their stream)
                    assert await redis.exists(
                        keys.seen(stored_delivery(entries), keys.inbox_shard(merchant, 3), 3)
                    )
                assert await eventually(lambda: _drained(redis, 3), timeout_s=10)
                assert await count_webhooks(redis, 0, 2**62, shards=3) >= 3
                for merchant in merchants:
                    assert await count_webhooks(redis, 0, 2**62, merchant, shards=3) >= 1
        for merchant in merchants:
            assert balance(box, merchant, ORDER_CUSTOMER) == 15


def stored_delivery(entries: list[Any]) -> str:
    (_, fields), *_ = entries
    return str(fields[b"delivery"].decode())


async def _drained(redis: Redis, shards: int) -> bool:
    from service import inbox

    return (await inbox.backlog(redis, shards)).total == 0
