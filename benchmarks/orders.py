"""Order truth's cost in Salla calls: questions per 1,000 orders, confirmations, reconciliation.

* ambiguity fetches: orders taken to `GET /orders/{id}` per 1,000 orders, for clean traffic
  (one event per second of an order: the target is 0) and for traffic where a fifth of the
  orders have several events in one second (a total edit in the second of its completion, a
  quick cancel and re-complete): each event goes through the real processing path;
* held-grant confirmations: one `GET /orders/{id}` per held order whose window ends;
* reconciliation: list calls against `ceil(orders in window / page size)`, plus one details
  call per order that changed, for one store with 300 orders of which 30 changed unseen.

Everything runs against a real redis-server and the sandbox over real HTTP.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import httpx
from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import keys, ledger, queue
from service.delivery.deps import Deps as DeliveryDeps
from service.orders import reconcile, truth
from service.processing import ProcessingDeps, apply_rules
from service.rules import load_rules, parse_rules_text
from service.salla import SallaClient
from service.sandbox.app import Sandbox, create_sandbox_app
from service.settings import Settings
from service.webhooks import parse_envelope
from tests.support.servers import serve_in_thread

ROOT = Path(__file__).parent.parent
MERCHANT = 4_200_000
JS = "%a %b %d %Y %H:%M:%S GMT+0300"


def _body(event: str, order: dict[str, Any], at: int, history_id: int | None) -> bytes:
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(at, dt.timezone(dt.timedelta(hours=3))).strftime(JS)
    data: dict[str, Any] = (
        {"id": history_id, "status": "x", "order": order}
        if event == "order.status.updated"
        else order
    )
    doc = {"event": event, "merchant": MERCHANT, "created_at": stamp, "data": data}
    return json.dumps(doc).encode()


def _order(order_id: int, status: str, total: int) -> dict[str, Any]:
    return {
        "id": order_id,
        "reference_id": order_id,
        "status": {"slug": status},
        "amounts": {"total": {"amount": total}},
        "customer": {"id": 900_000 + order_id % 97},
    }


async def _traffic(deps: ProcessingDeps, orders: int, tangled_share: float) -> int:
    """Process `orders` order lives; return how many orders were taken to Salla."""
    rng = random.Random(5)
    asked: set[int] = set()
    clock = 1_790_000_000
    arrival = 0
    for n in range(orders):
        order_id = 10_000_000 + n
        total = rng.randint(20, 900)
        tangled = rng.random() < tangled_share
        events: list[tuple[str, dict[str, Any], int, int | None]] = [
            ("order.created", _order(order_id, "under_review", total), clock, None),
            ("order.status.updated", _order(order_id, "completed", total), clock + 1, 2 * n + 1),
        ]
        if tangled:  # a total edit in the second of its completion, and a quick re-complete
            edit = _order(order_id, "completed", total + 10)
            events.append(("order.updated", edit, clock + 1, None))
            events.append(
                ("order.status.updated", _order(order_id, "canceled", total), clock + 2, 2 * n + 2)
            )
            events.append(("order.status.updated", edit, clock + 2, 2 * n + 3))
        clock += 3
        for event, order, at, history in events:
            arrival += 1
            env = parse_envelope(_body(event, order, at, history))
            result = await apply_rules(deps, env, f"d{arrival}", "bench", arrival=(arrival, 0))
            if result.get("asked_salla"):
                asked.add(order_id)
    return len(asked)


async def bench_orders(redis_url: str) -> dict[str, Any]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.flushall()
    pool: ArqRedis = await queue.connect(redis_url)
    box = Sandbox(rate_limit=100_000, rate_window_s=60, plan_rate_limit=100_000)
    try:
        with serve_in_thread(create_sandbox_app(box)) as url:
            settings = Settings(
                app_env="development",
                salla_api_base=url,
                rules_path=ROOT / "rules",
                orders_rate_limit_requests=100_000,
                order_clock_skew_s=10,
            )
            deps = ProcessingDeps(settings, redis, pool, load_rules(ROOT / "rules"))
            clean = await _traffic(deps, 1000, 0.0)
            await redis.flushall()
            tangled = await _traffic(deps, 1000, 0.2)
            await redis.flushall()
            calls = await _reconcile_calls(deps, box, redis, pool, settings)
    finally:
        await pool.aclose()
        await redis.aclose()
    return {
        "ambiguity_fetches_per_1000_clean_orders": clean,
        "ambiguity_fetches_per_1000_orders_fifth_same_second": tangled,
        **calls,
    }


async def _reconcile_calls(
    deps: ProcessingDeps, box: Sandbox, redis: Redis, pool: ArqRedis, settings: Settings
) -> dict[str, Any]:
    """One store, 300 orders seen by the ledger through their webhooks, then 30 changed with
    the webhooks lost: one reconciliation, its calls counted at the sandbox."""
    store = box.add_store(MERCHANT, plan_rate_limit=100_000, rate_limit=100_000)
    from service import tokens
    from service.salla import TokenSet

    await tokens.save(
        redis,
        MERCHANT,
        TokenSet(store.access_token, store.refresh_token, 2_000_000_000, store.scope),
    )
    ids = []
    for n in range(300):
        made = box.change_order(MERCHANT, customer_id=800_000 + n, total=100 + n)
        ids.append(made["order"]["id"])
    async with httpx.AsyncClient() as http:
        delivery = DeliveryDeps(settings, redis, pool, SallaClient(http, settings.salla_api_base))
        orders_deps = truth.Deps(deps, delivery)
        await reconcile.run_store(orders_deps, MERCHANT, in_job=False)  # the ledger learns them
        for order_id in ids[:30]:
            box.change_order(MERCHANT, order_id=order_id, status="completed")  # no webhook URL
        listed, got = (
            box.stores[MERCHANT].counters.get("orders_list", 0),
            box.stores[MERCHANT].counters.get("orders_get", 0),
        )
        report = await reconcile.run_store(orders_deps, MERCHANT, in_job=False)
        counters = dict(box.stores[MERCHANT].counters)
        confirmations = await _held_confirmations(orders_deps, box, redis)
    return {
        **confirmations,
        "reconcile_orders_in_window": report.listed,
        "reconcile_list_calls": counters.get("orders_list", 0) - listed,
        "reconcile_list_calls_target": math.ceil(report.listed / 15),
        "reconcile_details_calls": counters.get("orders_get", 0) - got,
        "reconcile_changed_orders": report.changed,
    }


HELD_RULES = """
version: 1
rules:
  - id: held_purchase
    on: [order.status.updated]
    when: order.completed_once
    points: order.total / 10
    type: plus
    reason: "order {order.reference_id}"
    hold_days: 14
"""
HELD_ORDERS = 40


async def _held_confirmations(
    orders_deps: truth.Deps, box: Sandbox, redis: Redis
) -> dict[str, Any]:
    """`HELD_ORDERS` completed orders whose points are held for a return window; the window
    ends (their due times are moved to the past: the only shortcut here); the flush's claim
    diverts them to confirmation, and each order's `order_truth` job asks Salla once."""
    held = ProcessingDeps(
        orders_deps.processing.settings,
        redis,
        orders_deps.processing.pool,
        parse_rules_text(HELD_RULES),
    )
    deps = truth.Deps(held, orders_deps.delivery)
    at = 1_790_500_000
    for n in range(HELD_ORDERS):
        made = box.change_order(MERCHANT, customer_id=700_000 + n, total=200, status="completed")
        order = _order(int(made["order"]["id"]), "completed", 200)
        env = parse_envelope(_body("order.status.updated", order, at + n, 5_000_000 + n))
        await apply_rules(held, env, f"h{n}", "bench", arrival=(at + n, 0))
    pending = keys.grant_set("pending", MERCHANT)
    due = await redis.zrange(pending, 0, -1)
    await redis.zadd(pending, dict.fromkeys(due, 0))  # the return window ended
    claim = await ledger.claim_due(
        redis,
        MERCHANT,
        limit=1000,
        claim_timeout_ms=60_000,
        token="bench",  # noqa: S106 - a claim token, not a secret
        verify_held=True,
    )
    before = box.stores[MERCHANT].counters.get("orders_get", 0)
    for order_id in sorted(claim.verify_orders):
        await truth.settle_order(deps, MERCHANT, order_id)
    asked = box.stores[MERCHANT].counters.get("orders_get", 0) - before
    per_order = round(asked / max(len(claim.verify_orders), 1), 2)
    return {
        "held_orders": len(claim.verify_orders),
        "held_confirmation_calls": asked,
        "held_confirmation_calls_per_held_order": per_order,
    }
