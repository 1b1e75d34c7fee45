"""Odd and hostile input, case by case, through real HTTP and a real worker (next to the fuzz
tests, which look for the cases nobody wrote down): every one gets a clear answer, never a 500,
and nothing is left stuck in the inbox."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service import keys, ledger, metrics, tokens
from service.app import create_app
from service.keys import WEBHOOK_STREAM
from service.salla import TokenSet
from service.sandbox.app import Sandbox
from service.settings import Settings
from service.webhooks import STORE_EVENTS, signed_headers
from tests.conftest import (
    SECRET,
    Service,
    eventually,
    fixture_bytes,
    fixture_json,
    inbox_empty,
    make_settings,
)
from tests.support.cli import cli
from tests.support.servers import serve_in_thread
from tests.support.store import ORDER_CUSTOMER, ORDER_MERCHANT, install, with_merchant

ADMIN_TOKEN = "hostile-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HUGE = "9" * 5000  # int() refuses strings over 4,300 digits: a ValueError wherever it is reached

#: Strings Python's int() or str.isdigit() take for numbers, and an id is not.
NOT_IDS = ["²", "١٢٣", "١", "12٣", "９９", "𝟗", HUGE, "-5", "0", "1e3", " ", "0x10"]


@pytest.fixture
def admin_web(redis: Redis, redis_url: str, settings: Settings) -> Iterator[Service]:
    """The web process with its admin routes on, sharing Redis and the sandbox with `worker`."""
    admin_settings = make_settings(settings.salla_api_base, admin_token=ADMIN_TOKEN)
    with serve_in_thread(create_app(admin_settings, redis_url)) as url:
        yield Service(url, admin_settings)


def json_lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line[:1] == "{"]


def order_with(**changes: Any) -> bytes:
    return with_merchant("order.status.updated.json", ORDER_MERCHANT, **changes)


class TestIdsAtTheEdge:
    """A merchant id in other digits is a 400 that says what an id is; nothing is kept."""

    @pytest.mark.parametrize("merchant", NOT_IDS)
    async def test_merchant_in_other_digits_is_400(
        self, admin_web: Service, redis: Redis, merchant: str
    ) -> None:
        doc = fixture_json("order.status.updated.json")
        doc["merchant"] = merchant
        answer = admin_web.post_webhook(json.dumps(doc, ensure_ascii=False).encode())
        assert answer.status_code == 400, answer.text
        assert answer.json() == {
            "status": "rejected",
            "error": "'merchant' must be a store id: a positive whole number of at most 19 "
            "ASCII digits, 0-9",
        }
        assert await redis.xlen(WEBHOOK_STREAM) == 0

    async def test_merchant_as_a_5000_digit_number_is_400(
        self, admin_web: Service, redis: Redis
    ) -> None:
        body = fixture_bytes("order.status.updated.json").replace(
            b'"merchant": 193718979', b'"merchant": ' + HUGE.encode(), 1
        )
        assert HUGE.encode() in body
        answer = admin_web.post_webhook(body)
        assert answer.status_code == 400 and answer.json()["status"] == "rejected"
        assert await redis.xlen(WEBHOOK_STREAM) == 0


class TestIdsInTheWorker:
    """The edge reads only the envelope; an order or customer id in other digits inside `data`
    is rejected by the worker at once (`event_rejected`), never tried ten times."""

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"data__order__id": "١٢٣"}, "data.order.id is '١٢٣'"),
            ({"data__order__id": "²"}, "data.order.id is '²'"),
            ({"data__order__customer__id": HUGE}, "data.order.customer.id is '99999"),
            ({"data__order__customer__id": -7}, "data.order.customer.id is -7"),
        ],
    )
    async def test_rejected_once_then_the_next_webhook_flows(
        self,
        admin_web: Service,
        worker: Any,
        redis: Redis,
        sandbox: tuple[str, Sandbox],
        capsys: pytest.CaptureFixture[str],
        change: dict[str, Any],
        field: str,
    ) -> None:
        install(admin_web, sandbox[1], ORDER_MERCHANT)
        odd = admin_web.post_webhook(order_with(**change))
        assert odd.json()["status"] == "accepted"  # the envelope is fine
        good = admin_web.post_webhook(fixture_bytes("order.status.updated.json"))
        assert good.json()["status"] == "accepted"
        await eventually(lambda: inbox_empty(redis), timeout_s=20)
        lines = json_lines(capsys.readouterr().err)
        (rejected,) = [x for x in lines if x["event"] == "event_rejected"]
        assert rejected["error"].startswith(field), rejected
        assert "not an id" in rejected["error"]
        assert not [x for x in lines if x["event"] in ("event_failed", "event_abandoned")]
        # Only Salla's real order earned anything, for the real customer.
        (processed,) = [
            x
            for x in lines
            if x["event"] == "event_processed" and x["salla_event"] == "order.status.updated"
        ]
        assert processed["customer_id"] == ORDER_CUSTOMER
        assert await ledger.entry(redis, ORDER_MERCHANT, "order:629263027") == {"purchase": 15}
        assert await ledger.entry(redis, ORDER_MERCHANT, "order:123") == {}


class TestReplaySkipsWhatItCannotRead:
    """A stored webhook the rules cannot read is reported and skipped; the range goes on."""

    async def test_http_and_cli_replay_report_it_and_replay_the_rest(
        self,
        admin_web: Service,
        worker: Any,
        redis: Redis,
        redis_url: str,
        sandbox: tuple[str, Sandbox],
    ) -> None:
        install(admin_web, sandbox[1], ORDER_MERCHANT)
        admin_web.post_webhook(order_with(data__order__id="٦٢٩٢٦٣٠٢٧"))
        admin_web.post_webhook(fixture_bytes("order.status.updated.json"))
        await eventually(lambda: inbox_empty(redis), timeout_s=20)
        assert await redis.xlen(WEBHOOK_STREAM) == 2  # both kept for replay

        answer = httpx.post(f"{admin_web.url}/admin/replay", headers=AUTH)
        assert answer.status_code == 200
        *lines, last = [json.loads(x) for x in answer.text.splitlines()]
        (skipped,) = lines
        assert skipped["outcome"] == "skipped" and skipped["diffs"] == []
        assert skipped["skipped"].startswith("data.order.id is '٦٢٩٢٦٣٠٢٧', not an id")
        assert last["summary"] == {"webhooks": 2, "changed": 0, "skipped": 1, "dry_run": True}

        result = await cli(redis_url, "admin", "replay")
        assert result.returncode == 0, result.stderr
        assert f"{skipped['stream_id']}  store {ORDER_MERCHANT}  order.status.updated  " in (
            result.stdout
        )
        assert "skipped: data.order.id is '٦٢٩٢٦٣٠٢٧', not an id" in result.stdout
        assert "2 webhook(s) replayed; 0 differ;" in result.stderr
        assert "1 skipped (not readable)" in result.stderr


class TestAdminIds:
    """Ids in admin paths, queries and CLI arguments: ASCII digits, else a 400 in the
    documented shape; errors of every kind in that shape."""

    @pytest.mark.parametrize("bad", NOT_IDS[:-2])  # " " and "0x10" are not path segments here
    @pytest.mark.parametrize(
        "path",
        [
            "/admin/stores/{bad}",
            "/admin/stores/{bad}/orders/1",
            "/admin/stores/1/orders/{bad}",
            "/admin/stores/1/customers/{bad}",
            "/admin/export?merchant={bad}",
        ],
    )
    def test_path_and_query_ids_are_400(self, admin_web: Service, path: str, bad: str) -> None:
        answer = httpx.get(admin_web.url + path.format(bad=bad), headers=AUTH)
        assert answer.status_code == 400, answer.text
        body = answer.json()
        assert body["status"] == "rejected"
        assert "must be an id (a positive whole number of at most 19 ASCII digits" in body["error"]
        assert len(body["error"]) < 200  # the 5,000 digits are not echoed back

    @pytest.mark.parametrize("bad", ["²", HUGE])
    def test_replay_merchant_query_is_400(self, admin_web: Service, bad: str) -> None:
        answer = httpx.post(f"{admin_web.url}/admin/replay?merchant={bad}", headers=AUTH)
        assert answer.status_code == 400
        assert answer.json()["error"].startswith("'merchant' must be an id")

    def test_errors_have_the_documented_shape(self, admin_web: Service) -> None:
        unknown = httpx.get(f"{admin_web.url}/admin/nope", headers=AUTH)
        assert (unknown.status_code, unknown.json()) == (
            404,
            {"status": "rejected", "error": "there is nothing at GET /admin/nope"},
        )
        order = httpx.get(f"{admin_web.url}/admin/stores/7/orders/8", headers=AUTH)
        assert (order.status_code, order.json()) == (
            404,
            {"status": "rejected", "error": "the ledger has nothing for order 8 of store 7"},
        )
        refused = httpx.get(f"{admin_web.url}/admin/stores/7")
        assert refused.status_code == 401 and set(refused.json()) == {"status", "error"}

    async def test_a_500_does_not_talk_about_webhooks(
        self, admin_web: Service, redis: Redis
    ) -> None:
        """A grant record broken in Redis (by hand, or by a bug) makes the view fail: the answer
        says where to look, not that an event was refused."""
        await redis.zadd(keys.customer_grants(7, 8), {"7-broken": 1})
        await redis.hset(keys.grant("7-broken"), mapping={"merchant": "x"})
        answer = httpx.get(f"{admin_web.url}/admin/stores/7/customers/8", headers=AUTH)
        assert answer.status_code == 500
        assert answer.json() == {
            "status": "error",
            "error": "internal error; the service's log has the details (unexpected_error)",
        }

    @pytest.mark.parametrize(
        "args",
        [
            ["admin", "store", "١٢٣"],
            ["admin", "order", "1", HUGE],
            ["admin", "customer", "²", "1"],
            ["admin", "export", "--merchant", "٣"],
        ],
    )
    async def test_cli_ids_are_a_usage_error(self, redis_url: str, args: list[str]) -> None:
        result = await cli(redis_url, *args)
        assert result.returncode == 2, result.stderr
        assert "is not an id (a positive whole number of at most 19 ASCII digits" in result.stderr
        assert "Traceback" not in result.stderr


class TestAuthorizeExpiry:
    """`app.store.authorize` with an `expires` no clock reaches is refused with one line; the
    store's admin view keeps working."""

    async def test_out_of_range_expiry_is_refused(
        self,
        admin_web: Service,
        worker: Any,
        redis: Redis,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        doc = fixture_json("app.store.authorize.json")
        doc["merchant"] = 4242
        doc["data"]["expires"] = 1e20
        assert admin_web.post_webhook(json.dumps(doc).encode()).json()["status"] == "accepted"

        seen: list[dict[str, Any]] = []

        def refused() -> list[dict[str, Any]]:
            seen.extend(json_lines(capsys.readouterr().err))
            return [x for x in seen if x["event"] == "store_authorize_refused"]

        (line,) = await eventually(refused, timeout_s=20)
        assert line == {
            **line,
            "event": "store_authorize_refused",
            "level": "error",
            "merchant": 4242,
            "expires": "1e+20",
        }
        assert "'expires' must be an epoch time before 253402300799" in line["why"]
        assert await tokens.get(redis, 4242) is None  # not stored
        state = httpx.get(f"{admin_web.url}/admin/stores/4242", headers=AUTH)
        assert state.status_code == 200 and state.json()["token"] is None

    async def test_a_stored_expiry_past_any_date_shows_as_unknown(
        self, admin_web: Service, redis: Redis
    ) -> None:
        """A record written before such values were refused still shows."""
        await tokens.save(redis, 4343, TokenSet("access", "refresh", 10**20, "scope"))
        state = httpx.get(f"{admin_web.url}/admin/stores/4343", headers=AUTH)
        assert state.status_code == 200, state.text
        assert state.json()["token"]["valid_until"] is None


class TestMetricsLabelsAreBounded:
    """Made-up event names count as `other`: 500 names do not make 500 series."""

    def test_unknown_event_names_count_as_other(self, admin_web: Service) -> None:
        def scrape() -> str:
            return httpx.get(f"{admin_web.url}/metrics").text

        def other_count(text: str) -> float:
            for line in text.splitlines():
                if line.startswith("salla_rewards_webhooks_total{") and (
                    'outcome="ignored"' in line and 'salla_event="other"' in line
                ):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        before = scrape()
        with httpx.Client(base_url=admin_web.url) as client:  # one client: 500 posts
            for n in range(500):
                body = json.dumps({"event": f"made.up.{n}", "merchant": 1, "data": {}}).encode()
                answer = client.post(
                    "/webhooks/salla", content=body, headers=signed_headers(body, SECRET)
                )
                assert answer.json()["status"] == "ignored"
        after = scrape()
        assert "made.up." not in after
        assert other_count(after) - other_count(before) == 500
        assert len(after) - len(before) < 1000  # one series at most, not 500
        labels = {
            part.split('"')[1]
            for line in after.splitlines()
            if line.startswith("salla_rewards_webhooks_total{")
            for part in line.split(",")
            if "salla_event=" in part
        }
        assert labels <= STORE_EVENTS | {"other", "unknown"} | {
            e for e in labels if e.startswith("app.")
        }

    def test_campaign_grants_count_as_one_rule(self) -> None:
        assert metrics.rule_label("campaign:ramadan-2026") == "campaign"
        assert metrics.rule_label("purchase") == "purchase"
        assert metrics.event_label("order.created") == "order.created"
        assert metrics.event_label("app.store.authorize") == "app.store.authorize"
        assert metrics.event_label("x" * 100) == "other"


class TestSandboxIds:
    """The sandbox (`salla-rewards sandbox`, `make run`) answers odd numbers as Salla does, with
    a 422 naming the field, not a 500."""

    @pytest.mark.parametrize(
        ("path", "field"),
        [
            ("/customers/loyalty/points?customer_id=²", "customer_id"),
            ("/customers/loyalty/points?customer_id=1&page=²", "page"),
            ("/orders?customer_id=١٢٣", "customer_id"),
            ("/orders?status=²", "status"),
            (f"/orders?per_page={HUGE}", "per_page"),
        ],
    )
    def test_odd_numbers_are_422(self, sandbox: tuple[str, Sandbox], path: str, field: str) -> None:
        url, box = sandbox
        store = box.add_store(77)
        answer = httpx.get(url + path, headers={"Authorization": f"Bearer {store.access_token}"})
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["error"]["fields"]
