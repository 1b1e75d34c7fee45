"""The sandbox as a small Salla store: orders in Salla's shapes over real HTTP, its rate limits
and scopes, the signed webhooks it sends (to a real receiving server) and their switches, and
its state file."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.errors import InvalidSignature, SandboxNotServing, SandboxStateError
from service.sandbox.app import Sandbox, create_sandbox_app
from service.sandbox.orders import STATUSES
from service.webhooks import verify
from tests.conftest import ROOT_DIR, SECRET, Service
from tests.support.servers import free_port, serve_in_thread, wait_until

CLI = [sys.executable, "-m", "service"]

MERCHANT = 193718979
CUSTOMER = 1779795066
ENVELOPE_TIME = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} \d\d \d{4} \d\d:\d\d:\d\d GMT\+0300$"
)
SALLA_DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.000000$")


@dataclass
class Receiver:
    """A real HTTP server standing in for the service: records every delivery it gets and
    checks its signature with the service's own `verify`."""

    url: str = ""
    status: int = 200
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(request: Request) -> JSONResponse:
            body = await request.body()
            try:
                verify(request.headers, body, SECRET, "signature")
            except InvalidSignature:
                with self.lock:
                    self.bad_signatures += 1
                return JSONResponse({"status": "rejected"}, 401)
            with self.lock:
                self.received.append({"body": body, "doc": json.loads(body)})
            return JSONResponse({"status": "accepted"}, self.status)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def docs(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["doc"] for r in self.received]


@dataclass
class Store:
    """The sandbox served over HTTP, one store installed, its webhooks going to `receiver`."""

    url: str
    box: Sandbox
    receiver: Receiver
    token: str

    def get(self, path: str, token: str | None = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.get(f"{self.url}{path}", params=params, headers=headers)

    def order(self, **fields: Any) -> dict[str, Any]:
        answer = httpx.post(f"{self.url}/_sandbox/orders", json={"merchant": MERCHANT, **fields})
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    with serve_in_thread(hook.app()) as url:
        hook.url = f"{url}/hook"
        yield hook


def serve_store(receiver: Receiver, **options: Any) -> Any:
    box = Sandbox(webhook_url=receiver.url, webhook_secret=SECRET)
    store = box.add_store(MERCHANT, **options)
    return box, store


@pytest.fixture
def store(receiver: Receiver) -> Iterator[Store]:
    box, installed = serve_store(receiver)
    with serve_in_thread(create_sandbox_app(box)) as url:
        yield Store(url, box, receiver, installed.access_token)


def envelope(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return doc["event"], doc["data"]


class TestOrderDetails:
    """`GET /orders/{id}` answers the order in Salla's shape."""

    def test_a_new_order_has_salla_shape(self, store: Store) -> None:
        made = store.order(total="154.00", customer_id=CUSTOMER, payment_method="mada")
        order_id = made["order"]["id"]
        answer = store.get(f"/orders/{order_id}")
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == 200 and body["success"] is True
        order = body["data"]
        assert order == made["order"]
        assert order["status"] == {
            "id": STATUSES["under_review"].id,
            "name": "بإنتظار المراجعة",
            "slug": "under_review",
            "customized": {
                "id": STATUSES["under_review"].customized_id,
                "name": "بإنتظار المراجعة",
            },
        }
        assert order["total"] == {"amount": 154, "currency": "SAR"}
        assert order["amounts"]["total"] == {"amount": 154, "currency": "SAR"}
        assert order["amounts"]["discounts"] == []
        assert order["payment_method"] == "mada"
        assert order["customer"]["id"] == CUSTOMER and "first_name" in order["customer"]
        assert order["customer"]["groups"] == []
        for key in ("date", "updated_at"):
            assert SALLA_DATE.match(order[key]["date"])
            assert order[key]["timezone"] == "Asia/Riyadh" and order[key]["timezone_type"] == 3
        assert order["first_complete_at"] is None
        assert order["items"][0]["amounts"]["total"]["amount"] == 154
        assert answer.headers["X-RateLimit-Limit"] == "120"  # the plan bucket's

    def test_first_complete_at_is_set_once_and_never_cleared(self, store: Store) -> None:
        order_id = store.order(total=50)["order"]["id"]
        completed = store.order(order_id=order_id, status="completed")["order"]
        first = completed["first_complete_at"]
        assert first is not None and SALLA_DATE.match(first["date"])
        canceled = store.order(order_id=order_id, status="canceled")["order"]
        assert canceled["first_complete_at"] == first
        assert canceled["status"]["name"] == "ملغي"

    def test_light_format_drops_items_and_groups(self, store: Store) -> None:
        order_id = store.order()["order"]["id"]
        order = store.get(f"/orders/{order_id}", format="light").json()["data"]
        assert "items" not in order and "groups" not in order["customer"]
        assert order["customer"]["id"] == CUSTOMER

    def test_reference_id_finds_the_order(self, store: Store) -> None:
        made = store.order(reference_id=777001)["order"]
        answer = store.get("/orders/0", reference_id=777001)
        assert answer.json()["data"]["id"] == made["id"]

    def test_unknown_order_is_404_in_the_error_envelope(self, store: Store) -> None:
        answer = store.get("/orders/424242")
        assert answer.status_code == 404
        assert answer.json() == {
            "status": 404,
            "success": False,
            "error": {"code": "NotFound", "message": "The order was not found"},
        }
        assert store.box.stores[MERCHANT].counters["orders_get"] == 1


class TestListOrders:
    """`GET /orders`: paginated, filtered, and without the customer."""

    def test_pages_of_15_newest_first_without_customer(self, store: Store) -> None:
        ids = [store.order(total=10 + n)["order"]["id"] for n in range(20)]
        first = store.get("/orders").json()
        assert [o["id"] for o in first["data"]] == sorted(ids, reverse=True)[:15]
        assert first["pagination"]["total"] == 20 and first["pagination"]["totalPages"] == 2
        assert first["pagination"]["perPage"] == 15 and first["pagination"]["currentPage"] == 1
        assert "page=2" in first["pagination"]["links"]["next"]
        second = store.get("/orders", page=2).json()
        assert [o["id"] for o in second["data"]] == sorted(ids, reverse=True)[15:]
        item = first["data"][0]
        assert "customer" not in item
        assert set(item) >= {"id", "reference_id", "total", "date", "status", "payment_method"}
        assert item["status"]["slug"] == "under_review" and item["items"]
        ascending = store.get("/orders", sort_by="id-asc", per_page=5).json()
        assert [o["id"] for o in ascending["data"]] == sorted(ids)[:5]

    def test_status_ids_customer_and_reference_filters(self, store: Store) -> None:
        a = store.order(customer_id=11)["order"]["id"]
        b = store.order(customer_id=12, reference_id=5005)["order"]["id"]
        store.order(order_id=a, status="completed")
        completed_id = STATUSES["completed"].id
        assert [
            o["id"] for o in store.get("/orders", **{"status[]": completed_id}).json()["data"]
        ] == [a]
        assert [o["id"] for o in store.get("/orders", customer_id=12).json()["data"]] == [b]
        assert [o["id"] for o in store.get("/orders", reference_id=5005).json()["data"]] == [b]
        both = httpx.get(
            f"{store.url}/orders",
            params=[("status[]", completed_id), ("status[]", STATUSES["under_review"].id)],
            headers={"Authorization": f"Bearer {store.token}"},
        )
        assert sorted(o["id"] for o in both.json()["data"]) == sorted([a, b])

    def test_dates_are_whole_days_in_riyadh(self, store: Store) -> None:
        # 23:30 and 00:30 Riyadh are the same UTC day (20:30 and 21:30 UTC, Jan 1).
        late = store.order(date="2024-01-01 23:30:00")["order"]
        early = store.order(date="2024-01-02 00:30:00")["order"]
        assert late["date"]["date"] == "2024-01-01 23:30:00.000000"
        day2 = store.get("/orders", from_date="2024-01-02", to_date="2024-01-02").json()["data"]
        assert [o["id"] for o in day2] == [early["id"]]
        day1 = store.get("/orders", to_date="2024-01-01").json()["data"]
        assert [o["id"] for o in day1] == [late["id"]]
        assert len(store.get("/orders", from_date="2024-01-01").json()["data"]) == 2

    def test_bad_filters_are_422(self, store: Store) -> None:
        answer = store.get("/orders", from_date="yesterday", per_page=0)
        assert answer.status_code == 422
        assert set(answer.json()["error"]["fields"]) == {"from_date", "per_page"}


class TestHistories:
    """`GET /orders/{id}/histories`: status changes, newest first, 15 a page."""

    def test_newest_first_fifteen_a_page_names_only(self, store: Store) -> None:
        order_id = store.order()["order"]["id"]
        cycle = ["in_progress", "completed", "canceled", "restoring", "restored"]
        for n in range(19):
            store.order(order_id=order_id, status=cycle[n % len(cycle)], note=f"step {n}")
        page1 = store.get(f"/orders/{order_id}/histories").json()
        page2 = store.get(f"/orders/{order_id}/histories", page=2).json()
        assert len(page1["data"]) == 15 and len(page2["data"]) == 5
        entries = page1["data"] + page2["data"]
        ids = [e["id"] for e in entries]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 20
        assert entries[0] == {
            "id": ids[0],
            "status": STATUSES[cycle[18 % 5]].name,
            "note": "step 18",
            "created_at": entries[0]["created_at"],
        }
        assert SALLA_DATE.match(entries[0]["created_at"]["date"])
        assert entries[-1]["status"] == "بإنتظار المراجعة"  # the order's first status
        assert store.get("/orders/999/histories").status_code == 404


class TestAccess:
    """Tokens and scopes, as Salla checks them."""

    def test_without_orders_read_is_401_until_granted(self, store: Store) -> None:
        order_id = store.order()["order"]["id"]
        store.box.update_store(MERCHANT, scope="offline_access customers.read_write")
        refused = store.get(f"/orders/{order_id}")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "Unauthorized"
        assert "orders.read" in refused.json()["error"]["message"]
        assert store.get("/orders").status_code == 401
        patched = httpx.patch(
            f"{store.url}/_sandbox/stores/{MERCHANT}", json={"scope": "orders.read_write"}
        )
        assert patched.json()["scope"] == "orders.read_write"
        assert store.get(f"/orders/{order_id}").status_code == 200

    def test_unknown_and_expired_tokens_are_401(self, store: Store) -> None:
        assert store.get("/orders", token="nope").status_code == 401
        httpx.post(f"{store.url}/_sandbox/stores/{MERCHANT}/expire")
        expired = store.get("/orders")
        assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]

    def test_a_refreshed_token_keeps_the_scope(self, store: Store) -> None:
        store.box.update_store(MERCHANT, scope="offline_access orders.read")
        refresh = store.box.stores[MERCHANT].refresh_token
        answer = httpx.post(
            f"{store.url}/oauth2/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh},
        ).json()
        assert answer["scope"] == "offline_access orders.read"
        assert store.get("/orders", token=answer["access_token"]).status_code == 200
        view = httpx.get(f"{store.url}/_sandbox/stores/{MERCHANT}").json()
        assert view["scope"] == "offline_access orders.read"
        assert view["access_token"] == answer["access_token"]


class TestControl:
    """Store options and fault switches are checked, and kept apart per kind of call."""

    def test_store_options_are_checked(self, store: Store) -> None:
        wrong = httpx.post(f"{store.url}/_sandbox/stores", json={"merchant": 5, "scop": "x"})
        assert wrong.status_code == 400 and "unknown option(s) scop" in wrong.json()["error"]
        assert 5 not in store.box.stores
        patch = f"{store.url}/_sandbox/stores"
        assert httpx.patch(f"{patch}/6", json={"scope": "x"}).status_code == 404
        zero = httpx.patch(f"{patch}/{MERCHANT}", json={"plan_rate_limit": 0})
        assert zero.status_code == 400 and "at least 1" in zero.json()["error"]

    def test_orders_faults_do_not_touch_loyalty_calls(self, store: Store) -> None:
        httpx.post(f"{store.url}/_sandbox/faults", json={"orders_statuses": [503]})
        loyalty = store.get("/customers/loyalty/points", customer_id=1)
        assert loyalty.status_code == 200
        assert store.get("/orders").status_code == 503
        assert store.get("/orders").status_code == 200
        assert store.box.stores[MERCHANT].counters["orders_fault_503"] == 1


class TestRateLimits:
    """Orders calls take from the plan bucket; loyalty calls from both buckets."""

    def test_orders_calls_exhaust_the_plan_bucket(self, receiver: Receiver) -> None:
        box, installed = serve_store(receiver, plan_rate_limit=3, plan_rate_window_s=60)
        with serve_in_thread(create_sandbox_app(box)) as url:
            auth = {"Authorization": f"Bearer {installed.access_token}"}
            answers = [httpx.get(f"{url}/orders", headers=auth) for _ in range(4)]
            assert [a.status_code for a in answers] == [200, 200, 200, 429]
            assert answers[0].headers["X-RateLimit-Limit"] == "3"
            assert int(answers[3].headers["Retry-After"]) >= 1
            assert answers[3].json()["error"]["code"] == "TooManyRequests"
            # The plan bucket is empty: a loyalty call is refused too, with its own headers.
            loyalty = httpx.get(
                f"{url}/customers/loyalty/points", params={"customer_id": 1}, headers=auth
            )
            assert loyalty.status_code == 429 and loyalty.headers["X-RateLimit-Limit"] == "500"
            counters = box.stores[MERCHANT].counters
            assert counters["orders_list"] == 3 and counters["orders_rate_limited"] == 1
            assert counters["rate_limited"] == 1

    def test_loyalty_calls_take_the_customers_bucket_too(self, receiver: Receiver) -> None:
        box, installed = serve_store(
            receiver, rate_limit=2, rate_window_s=600, plan_rate_limit=100, plan_rate_window_s=1e6
        )
        with serve_in_thread(create_sandbox_app(box)) as url:
            auth = {"Authorization": f"Bearer {installed.access_token}"}
            points = [
                httpx.get(
                    f"{url}/customers/loyalty/points", params={"customer_id": 1}, headers=auth
                )
                for _ in range(3)
            ]
            assert [p.status_code for p in points] == [200, 200, 429]
            assert points[0].headers["X-RateLimit-Limit"] == "2"
            # The customers bucket does not limit the orders endpoints.
            assert httpx.get(f"{url}/orders", headers=auth).status_code == 200
            plan = box.stores[MERCHANT].plan_bucket
            # Two loyalty calls and one orders call took from it (the refused one did not).
            assert round(plan.level) == 3


class TestWebhooks:
    """`POST /_sandbox/orders` sends signed webhooks in Salla's shapes, and each switch works."""

    def test_created_then_status_updated_in_salla_shapes(self, store: Store) -> None:
        made = store.order(total="154.00", customer_id=CUSTOMER)
        assert [w["fate"] for w in made["webhooks"]] == ["sent"]
        order_id = made["order"]["id"]
        changed = store.order(order_id=order_id, status="completed")
        docs = store.receiver.docs()
        assert [d["event"] for d in docs] == ["order.created", "order.status.updated"]
        assert store.receiver.bad_signatures == 0
        created, updated = docs
        assert created["merchant"] == MERCHANT and ENVELOPE_TIME.match(created["created_at"])
        assert created["data"]["id"] == order_id
        assert created["data"]["status"]["slug"] == "under_review"
        assert created["data"]["customer"]["first_name"]  # the full customer
        data = updated["data"]
        newest = store.get(f"/orders/{order_id}/histories").json()["data"][0]
        assert data["id"] == newest["id"] == changed["webhooks"][0]["history_id"]
        assert data["status"] == STATUSES["completed"].name
        assert data["order"]["id"] == order_id
        assert data["order"]["status"]["slug"] == "completed"
        assert data["order"]["total"] == {"amount": 154, "currency": "SAR"}
        assert data["order"]["customer"]["name"]  # the short customer
        assert data["order"]["first_complete_at"] is not None
        assert changed["webhooks"][0]["deliveries"][0]["status"] == 200

    def test_cancel_sends_order_cancelled_only_when_asked(self, store: Store) -> None:
        first = store.order()["order"]["id"]
        store.order(order_id=first, status="canceled")
        second = store.order()["order"]["id"]
        store.order(order_id=second, status="canceled", webhook={"order_cancelled": True})
        events = [(d["event"], d["data"].get("id")) for d in store.receiver.docs()]
        assert [e for e, _ in events] == [
            "order.created",
            "order.status.updated",
            "order.created",
            "order.status.updated",
            "order.cancelled",
        ]
        cancelled = store.receiver.docs()[-1]["data"]
        assert cancelled["id"] == second and cancelled["status"]["slug"] == "canceled"

    def test_total_and_customer_changes_send_order_updated(self, store: Store) -> None:
        order_id = store.order(total=100)["order"]["id"]
        store.order(order_id=order_id, total="80.50")
        store.order(order_id=order_id, customer_id=99)
        nothing = store.order(order_id=order_id, status="under_review")  # no change
        assert nothing["webhooks"] == []
        docs = store.receiver.docs()
        assert [d["event"] for d in docs] == ["order.created", "order.updated", "order.updated"]
        assert docs[1]["data"]["total"] == {"amount": 80.5, "currency": "SAR"}
        assert docs[2]["data"]["customer"]["id"] == 99

    def test_delete_sends_order_deleted_and_forgets_the_order(self, store: Store) -> None:
        order_id = store.order()["order"]["id"]
        answer = httpx.delete(f"{store.url}/_sandbox/orders/{MERCHANT}/{order_id}")
        assert answer.status_code == 200 and answer.json()["deleted"] is True
        assert store.receiver.docs()[-1]["event"] == "order.deleted"
        assert store.receiver.docs()[-1]["data"]["id"] == order_id
        assert store.get(f"/orders/{order_id}").status_code == 404
        again = httpx.delete(f"{store.url}/_sandbox/orders/{MERCHANT}/{order_id}")
        assert again.status_code == 404

    def test_drop_never_sends(self, store: Store) -> None:
        made = store.order(webhook={"drop": True})
        assert made["webhooks"][0]["fate"] == "dropped"
        assert store.receiver.docs() == []
        log = httpx.get(f"{store.url}/_sandbox/webhooks", params={"merchant": MERCHANT}).json()
        assert [(w["event"], w["fate"]) for w in log["webhooks"]] == [("order.created", "dropped")]

    def test_delay_sends_later(self, store: Store) -> None:
        made = store.order(webhook={"delay_s": 0.3})
        assert made["webhooks"][0]["fate"] == "delayed"
        assert store.receiver.docs() == []  # the answer came before the delivery
        wait_until(lambda: len(store.receiver.docs()) == 1, timeout_s=10)
        wait_until(lambda: store.box.stores[MERCHANT].webhooks[0]["fate"] == "sent")

    def test_twice_sends_identical_bytes(self, store: Store) -> None:
        store.order(webhook={"twice": True})
        bodies = [r["body"] for r in store.receiver.received]
        assert len(bodies) == 2 and bodies[0] == bodies[1]

    def test_same_second_and_explicit_created_at(self, store: Store) -> None:
        stamp = "Sun Jun 26 2022 12:21:48 GMT+0300"
        order_id = store.order(webhook={"created_at": stamp})["order"]["id"]
        store.order(order_id=order_id, status="completed", webhook={"same_second": True})
        store.order(order_id=order_id, status="canceled", webhook={"same_second": True})
        docs = store.receiver.docs()
        assert [d["created_at"] for d in docs] == [stamp, stamp, stamp]
        assert docs[1]["data"]["id"] < docs[2]["data"]["id"]  # history ids still rise

    def test_held_webhooks_are_released_in_reverse(self, store: Store) -> None:
        order_id = store.order()["order"]["id"]
        statuses = ["in_progress", "completed", "canceled", "completed"]
        for status in statuses:
            made = store.order(order_id=order_id, status=status, webhook={"hold": True})
            assert made["webhooks"][0]["fate"] == "held"
        assert len(store.receiver.docs()) == 1  # only order.created
        released = httpx.post(
            f"{store.url}/_sandbox/webhooks/release",
            json={"merchant": MERCHANT, "order": "reverse"},
        ).json()["released"]
        assert [r["fate"] for r in released] == ["sent"] * 4
        arrived = store.receiver.docs()[1:]
        slugs = [d["data"]["order"]["status"]["slug"] for d in arrived]
        assert slugs == list(reversed(statuses))
        ids = [d["data"]["id"] for d in arrived]
        assert ids == sorted(ids, reverse=True)
        assert store.box.stores[MERCHANT].held == []

    def test_shuffle_with_a_seed_is_reproducible(self, store: Store) -> None:
        order_id = store.order()["order"]["id"]
        statuses = ["in_progress", "shipped", "delivering", "delivered", "completed", "canceled"]
        for status in statuses:
            store.order(order_id=order_id, status=status, webhook={"hold": True})
        store.box.release_webhooks(MERCHANT, "shuffle", seed=7)
        expected = list(statuses)
        random.Random(7).shuffle(expected)
        arrived = [d["data"]["order"]["status"]["slug"] for d in store.receiver.docs()[1:]]
        assert arrived == expected != statuses

    def test_an_outage_drops_every_webhook_while_on(self, store: Store) -> None:
        switch = f"{store.url}/_sandbox/webhooks/outage"
        assert httpx.post(switch, json={"merchant": MERCHANT, "on": True}).status_code == 200
        made = store.order()
        assert made["webhooks"][0]["fate"] == "dropped"
        assert made["webhooks"][0]["reason"] == "outage"
        assert store.receiver.docs() == []
        httpx.post(switch, json={"on": False, "merchant": MERCHANT})
        httpx.post(switch, json={"on": True})  # sandbox-wide this time
        assert store.order()["webhooks"][0]["fate"] == "dropped"
        httpx.post(switch, json={"on": False})
        assert store.order()["webhooks"][0]["fate"] == "sent"
        assert len(store.receiver.docs()) == 1

    def test_failed_deliveries_are_recorded_and_resent(self, receiver: Receiver) -> None:
        receiver.status = 500
        box = Sandbox(
            webhook_url=receiver.url,
            webhook_secret=SECRET,
            webhook_resends=2,
            webhook_resend_delay_s=0.05,
        )
        box.add_store(MERCHANT)
        with serve_in_thread(create_sandbox_app(box)):
            made = box.change_order(MERCHANT, total=10)
            assert made["webhooks"][0]["fate"] == "retrying"
            wait_until(lambda: box.stores[MERCHANT].webhooks[0]["fate"] == "failed")
            deliveries = box.stores[MERCHANT].webhooks[0]["deliveries"]
            assert [d["status"] for d in deliveries] == [500, 500, 500]
            assert len(receiver.received) == 3
            receiver.status = 200
            assert box.change_order(MERCHANT, total=11)["webhooks"][0]["fate"] == "sent"

    def test_an_unreachable_service_is_a_failed_delivery(self) -> None:
        box = Sandbox(webhook_url="http://127.0.0.1:9/hook", webhook_secret=SECRET)
        box.add_store(MERCHANT)
        with serve_in_thread(create_sandbox_app(box)):
            webhook = box.change_order(MERCHANT)["webhooks"][0]
        assert webhook["fate"] == "failed"
        assert webhook["deliveries"][0]["error"].startswith("ConnectError")

    def test_bad_control_input_gets_a_sentence(self, store: Store) -> None:
        cases = [
            ({"merchant": MERCHANT, "status": "done"}, 400, "unknown status"),
            ({"merchant": MERCHANT, "total": "12.345"}, 400, "two decimals"),
            ({"merchant": MERCHANT, "colour": "red"}, 400, "unknown field"),
            ({"merchant": MERCHANT, "webhook": {"delay": 1}}, 400, "delay"),
            ({"merchant": 1}, 404, "no such store"),
            ({"status": "completed"}, 400, "merchant"),
        ]
        for body, status, words in cases:
            answer = httpx.post(f"{store.url}/_sandbox/orders", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert words in answer.json()["error"], (body, answer.text)
        assert httpx.post(f"{store.url}/_sandbox/orders", content=b"[").status_code == 400
        assert store.box.stores[MERCHANT].orders == {}
        assert store.receiver.docs() == []


class TestPythonApi:
    """Tests may drive the store from their own thread or event loop."""

    async def test_the_async_variant_from_another_loop(self, store: Store) -> None:
        made = await store.box.change_order_async(MERCHANT, total=12, webhook={"hold": True})
        assert made["webhooks"][0]["fate"] == "held"
        released = await store.box.release_webhooks_async(MERCHANT)
        assert [w["fate"] for w in released] == ["sent"]
        assert store.box.order(MERCHANT, made["order"]["id"]) == made["order"]
        assert len(store.receiver.docs()) == 1

    def test_a_sandbox_not_served_refuses_before_changing_anything(
        self, receiver: Receiver
    ) -> None:
        box, _ = serve_store(receiver)
        with pytest.raises(SandboxNotServing, match="serve it first"):
            box.change_order(MERCHANT, total=5)
        assert box.stores[MERCHANT].orders == {}


class TestPersistence:
    """With a state file, a new sandbox starts where the last one stopped."""

    def test_everything_survives_a_restart(self, tmp_path: Path, receiver: Receiver) -> None:
        path = tmp_path / "var" / "sandbox.json"
        box = Sandbox(webhook_url=receiver.url, webhook_secret=SECRET, state_file=path)
        with serve_in_thread(create_sandbox_app(box)) as url:
            installed = box.add_store(MERCHANT, scope="offline_access orders.read")
            auth = {"Authorization": f"Bearer {installed.access_token}"}
            body = {
                "type": "plus",
                "points": 15,
                "reason": "order",
                "channel_send": ["sms"],
                "customers": [CUSTOMER],
            }
            assert (
                httpx.post(f"{url}/customers/loyalty/points", json=body, headers=auth).status_code
                == 201
            )
            order_id = box.change_order(MERCHANT, total="154.00")["order"]["id"]
            box.change_order(MERCHANT, order_id, status="completed")
            box.change_order(MERCHANT, webhook={"hold": True})
            histories = httpx.get(f"{url}/orders/{order_id}/histories", headers=auth).json()
            before = httpx.get(f"{url}/_sandbox/stores/{MERCHANT}").json()
        again = Sandbox(webhook_url=receiver.url, webhook_secret=SECRET, state_file=path)
        with serve_in_thread(create_sandbox_app(again)) as url:
            after = httpx.get(f"{url}/_sandbox/stores/{MERCHANT}").json()
            assert after == before
            assert after["balances"] == {str(CUSTOMER): 15}
            assert after["counters"]["orders_histories"] == 1
            assert httpx.get(f"{url}/orders/{order_id}/histories", headers=auth).json() == histories
            changed = again.change_order(MERCHANT, order_id, status="canceled")
            assert changed["webhooks"][0]["history_id"] > histories["data"][0]["id"]
            assert len(again.release_webhooks(MERCHANT)) == 1  # the held webhook was kept
        assert [d["event"] for d in receiver.docs()] == [
            "order.created", "order.status.updated", "order.status.updated", "order.created"
        ]  # fmt: skip

    def test_a_change_is_on_disk_without_a_server(self, tmp_path: Path) -> None:
        path = tmp_path / "sandbox.json"
        box = Sandbox(state_file=path)
        box.add_store(MERCHANT)
        made = box.change_order(MERCHANT, total=5)
        assert made["webhooks"][0]["fate"] == "not_sent"
        again = Sandbox(state_file=path)
        assert again.order(MERCHANT, made["order"]["id"]) == made["order"]

    def test_an_unreadable_state_file_is_refused_with_a_sentence(self, tmp_path: Path) -> None:
        path = tmp_path / "sandbox.json"
        path.write_text('{"stores": 3}')
        with pytest.raises(SandboxStateError, match="not a sandbox state file"):
            Sandbox(state_file=path)
        result = subprocess.run(
            [sys.executable, "-m", "service", "sandbox", "--state-file", str(path), "--port", "9"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert "not a sandbox state file" in result.stderr and "Traceback" not in result.stderr


class TestWithTheService:
    """The service's own webhook route accepts what the sandbox store sends."""

    def test_the_service_accepts_sandbox_webhooks(
        self, web: Service, sandbox: tuple[str, Sandbox]
    ) -> None:
        _, box = sandbox
        box.send_webhooks_to(f"{web.url}/webhooks/salla", SECRET)
        box.add_store(MERCHANT)
        order_id = box.change_order(MERCHANT, total="154.00")["order"]["id"]
        webhooks = box.change_order(MERCHANT, order_id, status="completed")["webhooks"]
        webhooks += box.change_order(MERCHANT, order_id, total=99)["webhooks"]
        for webhook in box.stores[MERCHANT].webhooks:
            assert webhook["fate"] == "sent", webhook
            assert webhook["deliveries"][0]["status"] == 200
            assert '"accepted"' in webhook["deliveries"][0]["answer"]


class TestRunTwice:
    """`salla-rewards run` wires the sandbox store to the service, and a second `run` finds
    the demo store, its tokens, orders and balances where the first left them."""

    pytestmark = pytest.mark.timeout(300)

    def test_an_order_driven_by_hand_across_two_runs(self, tmp_path: Path) -> None:
        from service.supervisor import DEMO_MERCHANT
        from tests.support.processes import run_session

        ports = free_port(), free_port(), free_port()
        sandbox = f"http://127.0.0.1:{ports[1]}"

        def balance() -> int:
            view = httpx.get(f"{sandbox}/_sandbox/stores/{DEMO_MERCHANT}").json()
            return int(view["balances"].get(str(CUSTOMER), 0))

        def drive(**fields: Any) -> dict[str, Any]:
            answer = httpx.post(
                f"{sandbox}/_sandbox/orders", json={"merchant": DEMO_MERCHANT, **fields}
            )
            assert answer.status_code == 200, answer.text
            result: dict[str, Any] = answer.json()
            assert [w["fate"] for w in result["webhooks"]] == ["sent"], result["webhooks"]
            return result

        first: dict[str, Any] = {}
        for number in (1, 2):
            with run_session(
                tmp_path, CLI, ROOT_DIR, ports=ports, name=f"run{number}", BATCH_WINDOW_S="0.2"
            ) as session:
                session.wait_ready()
                view = httpx.get(f"{sandbox}/_sandbox/stores/{DEMO_MERCHANT}").json()
                if number == 1:
                    first = view
                    order_id = drive(total="154.00", customer_id=CUSTOMER)["order"]["id"]
                    drive(order_id=order_id, status="completed")
                    wait_until(lambda: balance() == 15, 60)
                else:
                    # The same store: same tokens (the service holds them), same order, points.
                    assert view["access_token"] == first["access_token"]
                    assert [o["status"] for o in view["orders"]] == ["completed"]
                    assert balance() == 15
                    drive(order_id=view["orders"][0]["id"], status="canceled")
                    wait_until(lambda: balance() == 0, 60)
                session.proc.terminate()
                assert session.proc.wait(timeout=60) == 0
        assert (tmp_path / "var" / "sandbox.json").exists()
